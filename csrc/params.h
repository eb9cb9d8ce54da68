// The contract between the torch host code (ops.cpp) and the tile kernels (tile_kernels.cuh).
// Plain C++: no torch headers, so the .cu files compile without them (docs/design.md §8).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastcl {

// What one launch of the tile kernel computes. Every launch walks the grid of
// (owner tile x other tile) of S = Q K^T: a block owns TILE consecutive lines of one side
// ("owner": query rows when own_rows, else key columns) and loops over the tiles of the other
// side assigned to its split (blockIdx.y).
enum class Mode : int {
  kSoftmaxStats = 0,  // per owner line: (max, sum exp(L - max)) over the denominator; label-positive sums
  kSoftmaxGrad = 1,   // acc[owner] += sum_other G * other_row  (G from the saved statistics)
  kSigmoid = 2,       // per owner row: sum softplus(-z L), sum G; acc += G * other_row, G = sigmoid(L) - [z = 1]
};

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// All pointers are device pointers. "Acc" is the accumulation type: double for float64 inputs,
// float otherwise. Row-indexed arrays have N entries (query rows), column-indexed arrays C
// entries (key columns, extra negatives included). Optional arrays are null when unused.
struct TileParams {
  const void* own;  // [n_own(_total), d] input dtype, row-major: the owner side
  const void* oth;  // [n_oth, d] input dtype: the other side
  int n_own;        // owner lines processed (N rows, or the first n_grad_cols key columns)
  int n_oth;        // lines of the other side (C when own_rows, else N)
  int d;
  bool own_rows;    // owner = query rows (dQ, row statistics) or key columns (dK, column statistics)

  // logits: L_ij = scale[i] * <q_i, k_j> (+ *bias for the sigmoid family)
  const void* scale;       // [N] Acc
  const void* bias;        // scalar Acc or null (sigmoid only)

  // softmax masks
  const int64_t* positive_index;  // [N] or null (label positives); sigmoid: -1 = no positive
  const int64_t* row_labels;      // [N] or null; labels mode iff non-null
  const int64_t* col_labels;      // [C]
  const bool* col_has_label;      // [C] or null (every column has a label)
  bool exclude_self;              // drop (i, i)
  bool decoupled;                 // drop positives from the denominator

  // softmax gradient: G_ij = w_row_i [j in D_i] exp(L_ij - lse_row_i)
  //                        + w_col_j [j in D_i] exp(L_ij - lse_col_j)   (symmetric)
  //                        - coef_row_i [j positive of i]   (one-hot: j = positive_index[i]; labels)
  // The target term is inside the tile, not added later: with bf16/fp16 staging of G, a
  // confident positive's w p_ij - coef_i ~ 0 must be formed before the rounding.
  const void* lse_row;   // [N] Acc, finite (0 where the row has no denominator)
  const void* w_row;     // [N] Acc, 0 on invalid rows
  const void* coef_row;  // [N] Acc or null (no target term)
  const void* lse_col;   // [C] Acc or null (symmetric only), finite
  const void* w_col;     // [C] Acc or null, 0 on columns that are not anchors
  const void* g_mul;     // scalar Acc or null: G is multiplied by it before staging (fp16 range)

  // outputs
  bool accumulate;       // kSoftmaxGrad / kSigmoid: update acc (kSigmoid may skip it: loss only)
  void* out0;            // stats: max; sigmoid: sum softplus          [n_split][out_stride] Acc
  void* out1;            // stats: sum exp; sigmoid: sum sigmoid        [n_split][out_stride] Acc
  void* out2;            // stats: label-positive logit sum (or null)   [n_split][out_stride] Acc
  void* out3;            // stats: label-positive count (or null)       [n_split][out_stride] Acc
  int64_t out_stride;
  void* acc;             // [n_split][acc_rows][acc_ld] Acc, zero-initialised; acc_rows, acc_ld
  int64_t acc_ld;        //   padded to multiples of the tile / D-chunk widths (no bounds checks)
  int64_t acc_split_stride;

  // the chunked gradient pass (own_rows, accumulate = false): every G tile, as staged for the
  // product, is also written to g_out [n_own][g_ld] (type G of the config: the input type for
  // fp16/bf16, else the accumulation type); the owner rows are rows row_offset.. of the call, so
  // exclude_self compares row_offset + i with j (the row-indexed arrays start at that row)
  void* g_out;
  int64_t g_ld;
  int row_offset;

  int n_split;           // gridDim.y: the other side's tiles are cut into n_split ranges
  int tiles_per_split;
};

// Tile geometry shared by host and device (see tile_kernels.cuh for the reasoning).
constexpr int kTile = 64;       // owner lines per block = other lines per step
constexpr int kThreads = 128;   // 4 warps, each owning 16 owner lines
constexpr int kAccChunk = 64;   // D-chunk of the gradient accumulator (acc_ld is a multiple)

// Launchers, one per input dtype, each in its own .cu file. tf32 selects tensor cores for
// float32 inputs (TF32 products); otherwise float32 and float64 run on exact CUDA-core FMAs.
cudaError_t launch_tile_fp16(const TileParams& p, Mode mode, cudaStream_t stream);
cudaError_t launch_tile_bf16(const TileParams& p, Mode mode, cudaStream_t stream);
cudaError_t launch_tile_fp32(const TileParams& p, Mode mode, cudaStream_t stream);
cudaError_t launch_tile_tf32(const TileParams& p, Mode mode, cudaStream_t stream);
cudaError_t launch_tile_fp64(const TileParams& p, Mode mode, cudaStream_t stream);

}  // namespace fastcl
