// Host glue of fastcl._C: check every input (dtype, shape, contiguity, then device), allocate
// the outputs, fill a TileParams and launch. Checks run before anything touches CUDA, so they can
// be tested with CPU tensors on a machine without a GPU.
//
// FASTCL_EMULATION_HOST (tests only): the same glue over CPU tensors, linked with
// csrc/testing/emulated_launchers.cpp, which runs the kernels on CPU threads.
#include "ops.h"

#include <ATen/ATen.h>
#ifndef FASTCL_EMULATION_HOST
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <utility>

#include "params.h"

// FASTCL_CUDA_ARCHS: the build's architectures joined by '_', e.g. -DFASTCL_CUDA_ARCHS=80_90
// (no quotes, semicolons or commas, which the build tools' command lines would split)
#define FASTCL_STR_(...) #__VA_ARGS__
#define FASTCL_STR(...) FASTCL_STR_(__VA_ARGS__)
#ifdef FASTCL_CUDA_ARCHS
#define FASTCL_CUDA_ARCHS_STRING FASTCL_STR(FASTCL_CUDA_ARCHS)
#else
#define FASTCL_CUDA_ARCHS_STRING ""
#endif

namespace fastcl {
namespace {

#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK_TYPE((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")
// a 1-D metadata vector: dtype, length, contiguity (the device is checked with the others)
#define CHECK_VECTOR(x, dtype, length) check_vector(x, #x, dtype, length)
#define CHECK_OPTIONAL_VECTOR(x, dtype, length) \
  do {                                          \
    if ((x).has_value()) check_vector(*(x), #x, dtype, length); \
  } while (0)

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t length) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, name, " must have shape [", length, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

using Named = std::pair<const char*, const at::Tensor*>;

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// query/key: same floating dtype, [N, D] and [C, D], contiguous, sizes the kernels index with int.
void check_features(const at::Tensor& query, const at::Tensor& key) {
  const auto dt = query.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
                   "query must be float16, bfloat16, float32 or float64, got ", dt);
  CHECK_DTYPE(key, dt);
  TORCH_CHECK_VALUE(query.dim() == 2, "query must have shape [N, D], got ", query.sizes());
  TORCH_CHECK_VALUE(key.dim() == 2, "key must have shape [C, D], got ", key.sizes());
  TORCH_CHECK_VALUE(key.size(1) == query.size(1), "key must have D = ", query.size(1), " columns like query, got ",
                    key.sizes());
  TORCH_CHECK_VALUE(query.size(0) > 0 && key.size(0) > 0 && query.size(1) > 0,
                    "query and key must be non-empty, got ", query.sizes(), " and ", key.sizes());
  constexpr int64_t kMax = std::numeric_limits<int>::max() - kTile;
  TORCH_CHECK_VALUE(query.size(0) < kMax && key.size(0) < kMax && query.size(1) < kMax,
                    "query/key sizes must be below 2^31, got ", query.sizes(), " and ", key.sizes());
  CHECK_CONTIGUOUS(query);
  CHECK_CONTIGUOUS(key);
}

void check_labels(const std::optional<at::Tensor>& row_labels, const std::optional<at::Tensor>& col_labels,
                  const std::optional<at::Tensor>& col_has_label, int64_t n, int64_t c) {
  CHECK_OPTIONAL_VECTOR(row_labels, at::kLong, n);
  CHECK_OPTIONAL_VECTOR(col_labels, at::kLong, c);
  CHECK_OPTIONAL_VECTOR(col_has_label, at::kBool, c);
  TORCH_CHECK_VALUE(row_labels.has_value() == col_labels.has_value(),
                    "row_labels and col_labels must be given together");
}

// The softmax gradient's per-line weights (docs/design.md §4): row vectors [N], column vectors [C].
void check_softmax_weights(const std::optional<at::Tensor>& lse_row, const std::optional<at::Tensor>& w_row,
                           const std::optional<at::Tensor>& coef_row, const std::optional<at::Tensor>& lse_col,
                           const std::optional<at::Tensor>& w_col, at::ScalarType acc, int64_t n, int64_t c) {
  CHECK_OPTIONAL_VECTOR(lse_row, acc, n);
  CHECK_OPTIONAL_VECTOR(w_row, acc, n);
  CHECK_OPTIONAL_VECTOR(coef_row, acc, n);
  CHECK_OPTIONAL_VECTOR(lse_col, acc, c);
  CHECK_OPTIONAL_VECTOR(w_col, acc, c);
  TORCH_CHECK_VALUE(lse_col.has_value() == w_col.has_value(), "lse_col and w_col must be given together");
}

// A one-value tensor in the accumulation dtype (the sigmoid bias, the fp16 gradient scale).
void check_scalar(const std::optional<at::Tensor>& t, const char* name, at::ScalarType acc) {
  if (!t.has_value()) return;
  TORCH_CHECK_TYPE(t->scalar_type() == acc, name, " must have dtype ", acc, ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->numel() == 1, name, " must hold one value, got shape ", t->sizes());
}

// Last: every tensor on query's CUDA device, and a device the kernels were built for.
void check_devices(const at::Tensor& query, std::initializer_list<Named> tensors) {
#ifdef FASTCL_EMULATION_HOST
  TORCH_CHECK_VALUE(query.is_cpu(), "query must be a CPU tensor (emulated kernels), got device ", query.device());
#else
  TORCH_CHECK_VALUE(query.is_cuda(), "query must be a CUDA tensor, got device ", query.device());
#endif
  for (const Named& t : tensors) {
    if (t.second == nullptr) continue;
    TORCH_CHECK_VALUE(t.second->device() == query.device(), t.first, " must be on ", query.device(),
                      " like query, got ", t.second->device());
  }
}

// (cudaDeviceGetAttribute rather than ATen/cuda/CUDAContext.h, which needs the cuSPARSE and
// cuBLAS headers that a minimal CUDA toolkit lacks)
int device_attribute(cudaDeviceAttr attr) {
#ifdef FASTCL_EMULATION_HOST
  return attr == cudaDevAttrMultiProcessorCount ? 2 : 9;  // a small "GPU": auto splits happen
#else
  int device = 0, value = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess, "fastcl: cudaGetDevice failed");
  TORCH_CHECK(cudaDeviceGetAttribute(&value, attr, device) == cudaSuccess, "fastcl: cudaDeviceGetAttribute failed");
  return value;
#endif
}

void check_capability() {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor);
  TORCH_CHECK(major >= 8, "fastcl's CUDA kernels need compute capability 8.0 or newer; the device has ", major, ".",
              minor);
}

// Cut the other side's tiles into splits so that small N still fills the GPU: blocks along the
// owner side x splits ~ 2 waves, at most max_split (each split costs an O(n_own) or
// O(n_own * D) partial buffer, reduced in a fixed order afterwards).
void choose_split(TileParams& p, int64_t requested, int max_split) {
  const int64_t tiles = cdiv(p.n_oth, kTile);
  int64_t split = requested;
  if (split <= 0) {
    const int64_t blocks = cdiv(p.n_own, kTile);
    const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
    split = std::min<int64_t>(cdiv(2 * sms, blocks), max_split);
  }
  split = std::max<int64_t>(1, std::min<int64_t>(split, tiles));
  const int64_t per_split = cdiv(tiles, split);
  p.tiles_per_split = static_cast<int>(per_split);
  p.n_split = static_cast<int>(cdiv(tiles, per_split));  // no empty split
}

#ifdef FASTCL_EMULATION_HOST
#define FASTCL_DEVICE_GUARD(t)
#define cudaGetErrorString(err) "emulated launch failed"
#else
#define FASTCL_DEVICE_GUARD(t) const c10::cuda::CUDAGuard guard((t).device())
#endif

void launch(const TileParams& p, Mode mode, at::ScalarType dtype, bool allow_tf32) {
#ifdef FASTCL_EMULATION_HOST
  const cudaStream_t stream = nullptr;
#else
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#endif
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kHalf: err = launch_tile_fp16(p, mode, stream); break;
    case at::kBFloat16: err = launch_tile_bf16(p, mode, stream); break;
    case at::kFloat: err = allow_tf32 ? launch_tile_tf32(p, mode, stream) : launch_tile_fp32(p, mode, stream); break;
    case at::kDouble: err = launch_tile_fp64(p, mode, stream); break;
    default: TORCH_CHECK(false, "fastcl: no kernel for dtype ", dtype);
  }
  TORCH_CHECK(err == cudaSuccess, "fastcl: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void set_sides(TileParams& p, const at::Tensor& query, const at::Tensor& key, bool own_rows, int64_t n_own) {
  p.own = own_rows ? query.data_ptr() : key.data_ptr();
  p.oth = own_rows ? key.data_ptr() : query.data_ptr();
  p.own_rows = own_rows;
  p.n_own = static_cast<int>(n_own);
  p.n_oth = static_cast<int>(own_rows ? key.size(0) : query.size(0));
  p.d = static_cast<int>(query.size(1));
}

void set_masks(TileParams& p, const std::optional<at::Tensor>& positive_index,
               const std::optional<at::Tensor>& row_labels, const std::optional<at::Tensor>& col_labels,
               const std::optional<at::Tensor>& col_has_label, bool exclude_self, bool decoupled) {
  p.positive_index = ptr_or_null<const int64_t>(positive_index);
  p.row_labels = ptr_or_null<const int64_t>(row_labels);
  p.col_labels = ptr_or_null<const int64_t>(col_labels);
  p.col_has_label = ptr_or_null<const bool>(col_has_label);
  p.exclude_self = exclude_self;
  p.decoupled = decoupled;
}

// Zero-initialised [n_split, rows, ld] accumulator padded to whole tiles and D-chunks.
at::Tensor alloc_acc(TileParams& p, const at::TensorOptions& opts) {
  const int64_t rows = cdiv(p.n_own, kTile) * kTile, ld = cdiv(p.d, kAccChunk) * kAccChunk;
  at::Tensor acc = at::zeros({p.n_split, rows, ld}, opts);
  p.acc = acc.data_ptr();
  p.acc_ld = ld;
  p.acc_split_stride = rows * ld;
  return acc;
}

// Sum the split partials in a fixed order and crop the padding: [n_own, D], contiguous (the
// operator's schema promises a plain tensor, and the padded buffer is freed at once).
at::Tensor finish_acc(const at::Tensor& acc, const TileParams& p) {
  const at::Tensor total = p.n_split == 1 ? acc.select(0, 0) : acc.sum(0);
  return total.narrow(0, 0, p.n_own).narrow(1, 0, p.d).contiguous();
}

}  // namespace

std::vector<at::Tensor> softmax_stats(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                                      const std::optional<at::Tensor>& positive_index,
                                      const std::optional<at::Tensor>& row_labels,
                                      const std::optional<at::Tensor>& col_labels,
                                      const std::optional<at::Tensor>& col_has_label, bool own_rows, bool exclude_self,
                                      bool decoupled, bool allow_tf32, int64_t n_split) {
  check_features(query, key);
  const int64_t n = query.size(0), c = key.size(0);
  const at::ScalarType acc = acc_dtype(query.scalar_type());
  CHECK_VECTOR(scale_rows, acc, n);
  CHECK_OPTIONAL_VECTOR(positive_index, at::kLong, n);
  check_labels(row_labels, col_labels, col_has_label, n, c);
  check_devices(query, {{"key", &key}, {"scale_rows", &scale_rows}, {"positive_index", opt(positive_index)},
                        {"row_labels", opt(row_labels)}, {"col_labels", opt(col_labels)},
                        {"col_has_label", opt(col_has_label)}});
  FASTCL_DEVICE_GUARD(query);
  check_capability();

  TileParams p{};
  set_sides(p, query, key, own_rows, own_rows ? n : c);
  set_masks(p, positive_index, row_labels, col_labels, col_has_label, exclude_self, decoupled);
  p.scale = scale_rows.data_ptr();
  choose_split(p, n_split, 16);

  const auto opts = query.options().dtype(acc);
  const bool label_sums = row_labels.has_value() && own_rows;
  at::Tensor mx = at::empty({p.n_split, p.n_own}, opts), sum = at::empty({p.n_split, p.n_own}, opts);
  at::Tensor pos_sum = label_sums ? at::empty({p.n_split, p.n_own}, opts) : at::empty({0}, opts);
  at::Tensor pos_cnt = label_sums ? at::empty({p.n_split, p.n_own}, opts) : at::empty({0}, opts);
  p.out0 = mx.data_ptr();
  p.out1 = sum.data_ptr();
  p.out2 = label_sums ? pos_sum.data_ptr() : nullptr;
  p.out3 = label_sums ? pos_cnt.data_ptr() : nullptr;
  p.out_stride = p.n_own;
  launch(p, Mode::kSoftmaxStats, query.scalar_type(), allow_tf32);

  at::Tensor lse;
  if (p.n_split == 1) {
    lse = mx.select(0, 0) + sum.select(0, 0).log();  // (-inf, 0) -> -inf: an empty denominator
  } else {
    const at::Tensor top = mx.amax(0);
    const at::Tensor ref = top.masked_fill(top.isneginf(), 0);
    lse = top + (sum * (mx - ref).exp()).sum(0).log();
  }
  if (label_sums) {
    pos_sum = pos_sum.sum(0);
    pos_cnt = pos_cnt.sum(0);
  }
  return {lse, pos_sum, pos_cnt};
}

at::Tensor softmax_grad(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                        const std::optional<at::Tensor>& positive_index, const std::optional<at::Tensor>& row_labels,
                        const std::optional<at::Tensor>& col_labels, const std::optional<at::Tensor>& col_has_label,
                        const at::Tensor& lse_row, const at::Tensor& w_row, const std::optional<at::Tensor>& coef_row,
                        const std::optional<at::Tensor>& lse_col, const std::optional<at::Tensor>& w_col,
                        bool own_rows, int64_t n_own, bool exclude_self, bool decoupled,
                        const std::optional<at::Tensor>& g_scale, bool allow_tf32, int64_t n_split) {
  check_features(query, key);
  const int64_t n = query.size(0), c = key.size(0), d = query.size(1);
  const at::ScalarType acc = acc_dtype(query.scalar_type());
  CHECK_VECTOR(scale_rows, acc, n);
  CHECK_OPTIONAL_VECTOR(positive_index, at::kLong, n);
  check_labels(row_labels, col_labels, col_has_label, n, c);
  check_softmax_weights(lse_row, w_row, coef_row, lse_col, w_col, acc, n, c);
  check_scalar(g_scale, "g_scale", acc);
  const int64_t max_own = own_rows ? n : c;
  TORCH_CHECK_VALUE(0 <= n_own && n_own <= max_own, "n_own must lie in [0, ", max_own, "], got ", n_own);
  check_devices(query, {{"key", &key}, {"scale_rows", &scale_rows}, {"positive_index", opt(positive_index)},
                        {"row_labels", opt(row_labels)}, {"col_labels", opt(col_labels)},
                        {"col_has_label", opt(col_has_label)}, {"lse_row", &lse_row}, {"w_row", &w_row},
                        {"coef_row", opt(coef_row)}, {"lse_col", opt(lse_col)}, {"w_col", opt(w_col)},
                        {"g_scale", opt(g_scale)}});
  FASTCL_DEVICE_GUARD(query);
  check_capability();

  const auto opts = query.options().dtype(acc);
  if (n_own == 0) return at::zeros({0, d}, opts);

  TileParams p{};
  set_sides(p, query, key, own_rows, n_own);
  set_masks(p, positive_index, row_labels, col_labels, col_has_label, exclude_self, decoupled);
  p.scale = scale_rows.data_ptr();
  p.lse_row = lse_row.data_ptr();
  p.w_row = w_row.data_ptr();
  p.coef_row = ptr_or_null<const void>(coef_row);
  p.lse_col = ptr_or_null<const void>(lse_col);
  p.w_col = ptr_or_null<const void>(w_col);
  p.accumulate = true;
  choose_split(p, n_split, 4);

  // g_scale (fp16, fastcl.backends.common.float16_gradient_scale): G is staged divided by it, so
  // small products of the softmax and the upstream gradient stay above float16's subnormal
  // range, and the accumulator is multiplied back
  at::Tensor g_inv;
  if (g_scale.has_value()) {
    g_inv = g_scale->reciprocal();
    p.g_mul = g_inv.data_ptr();
  }

  at::Tensor buf = alloc_acc(p, opts);
  launch(p, Mode::kSoftmaxGrad, query.scalar_type(), allow_tf32);
  at::Tensor out = finish_acc(buf, p);
  if (g_scale.has_value()) out = out * *g_scale;
  return out;
}

std::vector<at::Tensor> sigmoid_pass(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                                     const std::optional<at::Tensor>& positive_index,
                                     const std::optional<at::Tensor>& bias, bool own_rows, int64_t n_own,
                                     bool accumulate, const std::optional<at::Tensor>& row_labels,
                                     const std::optional<at::Tensor>& col_labels, bool allow_tf32, int64_t n_split) {
  check_features(query, key);
  const int64_t n = query.size(0), c = key.size(0), d = query.size(1);
  const at::ScalarType acc = acc_dtype(query.scalar_type());
  CHECK_VECTOR(scale_rows, acc, n);
  CHECK_OPTIONAL_VECTOR(positive_index, at::kLong, n);
  check_labels(row_labels, col_labels, std::nullopt, n, c);
  check_scalar(bias, "bias", acc);
  const int64_t max_own = own_rows ? n : c;
  TORCH_CHECK_VALUE(0 <= n_own && n_own <= max_own, "n_own must lie in [0, ", max_own, "], got ", n_own);
  check_devices(query, {{"key", &key}, {"scale_rows", &scale_rows}, {"positive_index", opt(positive_index)},
                        {"bias", opt(bias)}, {"row_labels", opt(row_labels)}, {"col_labels", opt(col_labels)}});
  FASTCL_DEVICE_GUARD(query);
  check_capability();

  const auto opts = query.options().dtype(acc);
  const at::Tensor empty = at::empty({0}, opts);
  if (n_own == 0) return {at::zeros({0, d}, opts), empty, empty};

  TileParams p{};
  set_sides(p, query, key, own_rows, n_own);
  p.scale = scale_rows.data_ptr();
  set_masks(p, positive_index, row_labels, col_labels, std::nullopt, false, false);
  p.bias = ptr_or_null<const void>(bias);
  p.accumulate = accumulate;
  choose_split(p, n_split, accumulate ? 4 : 16);

  at::Tensor loss = own_rows ? at::empty({p.n_split, p.n_own}, opts) : empty;
  at::Tensor gsum = own_rows ? at::empty({p.n_split, p.n_own}, opts) : empty;
  p.out0 = own_rows ? loss.data_ptr() : nullptr;
  p.out1 = own_rows ? gsum.data_ptr() : nullptr;
  p.out_stride = p.n_own;
  at::Tensor buf = accumulate ? alloc_acc(p, opts) : empty;
  launch(p, Mode::kSigmoid, query.scalar_type(), allow_tf32);
  return {accumulate ? finish_acc(buf, p) : empty, own_rows ? loss.sum(0) : empty, own_rows ? gsum.sum(0) : empty};
}

std::vector<at::Tensor> logit_grad(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale_rows,
                                   const std::optional<at::Tensor>& positive_index,
                                   const std::optional<at::Tensor>& row_labels,
                                   const std::optional<at::Tensor>& col_labels,
                                   const std::optional<at::Tensor>& col_has_label,
                                   const std::optional<at::Tensor>& lse_row, const std::optional<at::Tensor>& w_row,
                                   const std::optional<at::Tensor>& coef_row, const std::optional<at::Tensor>& lse_col,
                                   const std::optional<at::Tensor>& w_col, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& g_scale, const at::Tensor& g, int64_t row0,
                                   bool sigmoid, bool exclude_self, bool decoupled, bool allow_tf32, int64_t n_split) {
  check_features(query, key);
  const int64_t n = query.size(0), c = key.size(0), d = query.size(1);
  const at::ScalarType dt = query.scalar_type(), acc = acc_dtype(dt);
  CHECK_VECTOR(scale_rows, acc, n);
  CHECK_OPTIONAL_VECTOR(positive_index, at::kLong, n);
  check_labels(row_labels, col_labels, col_has_label, n, c);
  check_softmax_weights(lse_row, w_row, coef_row, lse_col, w_col, acc, n, c);
  TORCH_CHECK_VALUE(sigmoid || (lse_row.has_value() && w_row.has_value()),
                    "the softmax logit gradient needs lse_row and w_row");
  check_scalar(bias, "bias", acc);
  check_scalar(g_scale, "g_scale", acc);
  // G is written as the kernels stage it: the input type for fp16/bf16, else the accumulation type
  const at::ScalarType g_type = (dt == at::kHalf || dt == at::kBFloat16) ? dt : acc;
  CHECK_DTYPE(g, g_type);
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(1) == c && g.size(0) > 0, "g must have shape [R, ", c, "], got ",
                    g.sizes());
  TORCH_CHECK_VALUE(0 <= row0 && row0 + g.size(0) <= n, "rows [", row0, ", ", row0 + g.size(0),
                    ") must lie in [0, ", n, ")");
  CHECK_CONTIGUOUS(g);
  check_devices(query, {{"key", &key}, {"scale_rows", &scale_rows}, {"positive_index", opt(positive_index)},
                        {"row_labels", opt(row_labels)}, {"col_labels", opt(col_labels)},
                        {"col_has_label", opt(col_has_label)}, {"lse_row", opt(lse_row)}, {"w_row", opt(w_row)},
                        {"coef_row", opt(coef_row)}, {"lse_col", opt(lse_col)}, {"w_col", opt(w_col)},
                        {"bias", opt(bias)}, {"g_scale", opt(g_scale)}, {"g", &g}});
  FASTCL_DEVICE_GUARD(query);
  check_capability();

  // the chunk's rows are the owner side: query and every row-indexed vector start at row0
  const int64_t rows = g.size(0);
  auto from_row0 = [row0](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    return t.has_value() ? std::optional<at::Tensor>(t->narrow(0, row0, t->size(0) - row0)) : std::nullopt;
  };
  const at::Tensor own = query.narrow(0, row0, rows);
  TileParams p{};
  set_sides(p, own, key, true, rows);
  p.d = static_cast<int>(d);
  set_masks(p, from_row0(positive_index), from_row0(row_labels), col_labels, col_has_label, exclude_self, decoupled);
  p.row_offset = static_cast<int>(row0);
  const at::Tensor scale = scale_rows.narrow(0, row0, rows);
  p.scale = scale.data_ptr();
  const auto lse = from_row0(lse_row), w = from_row0(w_row), coef = from_row0(coef_row);
  p.lse_row = ptr_or_null<const void>(lse);
  p.w_row = ptr_or_null<const void>(w);
  p.coef_row = ptr_or_null<const void>(coef);
  p.lse_col = ptr_or_null<const void>(lse_col);
  p.w_col = ptr_or_null<const void>(w_col);
  p.bias = ptr_or_null<const void>(bias);
  at::Tensor g_inv;
  if (g_scale.has_value()) {  // the kernels multiply G by g_mul before staging it
    g_inv = g_scale->reciprocal();
    p.g_mul = g_inv.data_ptr();
  }
  p.accumulate = false;
  p.g_out = g.data_ptr();
  p.g_ld = c;
  choose_split(p, n_split, 16);

  const auto opts = query.options().dtype(acc);
  at::Tensor loss = sigmoid ? at::empty({p.n_split, rows}, opts) : at::empty({0}, opts);
  at::Tensor gsum = sigmoid ? at::empty({p.n_split, rows}, opts) : at::empty({0}, opts);
  p.out0 = sigmoid ? loss.data_ptr() : nullptr;
  p.out1 = sigmoid ? gsum.data_ptr() : nullptr;
  p.out_stride = rows;
  launch(p, sigmoid ? Mode::kSigmoid : Mode::kSoftmaxGrad, dt, allow_tf32);
  if (!sigmoid) return {};
  return {loss.sum(0), gsum.sum(0)};
}

bool built_with_cuda() {
#ifdef FASTCL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
  const std::string all = FASTCL_CUDA_ARCHS_STRING;
  size_t start = 0;
  while (start < all.size()) {
    const size_t end = std::min(all.find('_', start), all.size());
    if (end > start) archs.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  return archs;
}

}  // namespace fastcl
