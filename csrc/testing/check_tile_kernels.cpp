// Runs every configuration and mode of the tile kernel on the CPU (emulate.h) against a naive
// float64 reference of the contract in csrc/ops.h, over shapes with tails in N, C and D,
// D-chunk loops, splits of the other side, and every mask. Exit status 0 when all agree.
//
//   g++ -std=c++20 -O2 -pthread -I/usr/local/cuda/include csrc/testing/check_tile_kernels.cpp -o check
//   ./check            (tests/test_cuda.py builds and runs it)
#include "emulate.h"

#include "../tile_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>
#include <string>

using namespace fastcl;

static_assert(kThreads == fastcl_emulation::kBlockThreads, "the emulator runs blocks of kThreads threads");

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Case {
  const char* name;
  int n, c, d;
  bool labels, col_mask, exclude_self, decoupled, symmetric;
  int n_grad_cols;  // columns that get dK
  int n_split;      // requested split of the other side (0: one per tile)
};

const Case kCases[] = {
    {"one_hot_exclude_decoupled_symmetric", 70, 90, 37, false, false, true, true, true, 90, 2},
    {"labels_mask_exclude_decoupled_queue", 65, 130, 72, true, true, true, true, false, 100, 1},
    {"tiny_d1_symmetric", 20, 20, 1, false, false, false, false, true, 20, 0},
    {"labels_wide_d", 40, 70, 130, true, false, false, false, false, 70, 3},
};

template <class T> T from_double(double v);
template <> float from_double<float>(double v) { return static_cast<float>(v); }
template <> double from_double<double>(double v) { return v; }
template <> __half from_double<__half>(double v) { return __float2half_rn(static_cast<float>(v)); }
template <> __nv_bfloat16 from_double<__nv_bfloat16>(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
double to_double(float v) { return v; }
double to_double(double v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Problem {
  int n, c, d;
  std::vector<double> q, k;  // rounded to the input type
  std::vector<double> scale, lse_row, w_row, coef_row, lse_col, w_col;
  std::vector<int64_t> pos, row_labels, col_labels, sig_pos;  // sig_pos: -1 = no positive
  std::vector<char> col_has;  // bool storage for the kernels
  double bias;
  const Case* cs;

  double logit(int i, int j) const {
    double s = 0;
    for (int x = 0; x < d; ++x) s += q[i * d + x] * k[j * d + x];
    return s * scale[i];
  }
  bool excluded(int i, int j) const { return cs->exclude_self && i == j; }
  bool match(int i, int j) const {
    return cs->labels && !excluded(i, j) && row_labels[i] == col_labels[j] && (!cs->col_mask || col_has[j]);
  }
  bool positive(int i, int j) const { return cs->labels ? match(i, j) : j == pos[i]; }
  bool in_den(int i, int j) const { return !excluded(i, j) && !(cs->decoupled && positive(i, j)); }
};

struct Report {
  int failures = 0;
  void check(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double rtol) {
    double scale = 1e-2, err = 0;
    for (double w : want)
      if (std::isfinite(w)) scale = std::max(scale, std::abs(w));
    for (size_t i = 0; i < want.size(); ++i) {
      if (!std::isfinite(want[i]) || !std::isfinite(got[i])) {
        if (!(want[i] == got[i])) {
          std::printf("FAIL %s: entry %zu is %g, expected %g\n", what.c_str(), i, got[i], want[i]);
          ++failures;
          return;
        }
        continue;
      }
      err = std::max(err, std::abs(got[i] - want[i]));
    }
    const bool ok = err <= rtol * scale;
    if (!ok) ++failures;
    std::printf("%s %s: max err %.3e (tol %.1e x %.3e)\n", ok ? "ok  " : "FAIL", what.c_str(), err, rtol, scale);
  }
};

template <class Cfg>
struct Runner {
  using T = typename Cfg::T;
  using A = typename Cfg::A;
  const Problem& pb;
  std::vector<T> q, k;
  std::vector<A> scale, lse_row, w_row, coef_row, lse_col, w_col, bias;

  explicit Runner(const Problem& p) : pb(p) {
    for (double v : p.q) q.push_back(from_double<T>(v));
    for (double v : p.k) k.push_back(from_double<T>(v));
    auto cast = [](const std::vector<double>& v) { return std::vector<A>(v.begin(), v.end()); };
    scale = cast(p.scale), lse_row = cast(p.lse_row), w_row = cast(p.w_row), coef_row = cast(p.coef_row);
    lse_col = cast(p.lse_col), w_col = cast(p.w_col), bias = {A(p.bias)};
  }

  TileParams base(bool own_rows, int n_own) const {
    TileParams p{};
    p.own = own_rows ? static_cast<const void*>(q.data()) : k.data();
    p.oth = own_rows ? static_cast<const void*>(k.data()) : q.data();
    p.own_rows = own_rows;
    p.n_own = n_own;
    p.n_oth = own_rows ? pb.c : pb.n;
    p.d = pb.d;
    p.scale = scale.data();
    p.positive_index = pb.cs->labels ? nullptr : pb.pos.data();
    p.row_labels = pb.cs->labels ? pb.row_labels.data() : nullptr;
    p.col_labels = pb.cs->labels ? pb.col_labels.data() : nullptr;
    p.col_has_label = pb.cs->col_mask ? reinterpret_cast<const bool*>(pb.col_has.data()) : nullptr;
    p.exclude_self = pb.cs->exclude_self;
    p.decoupled = pb.cs->decoupled;
    // the split rule of ops.cpp (choose_split) with a requested count
    const int64_t tiles = cdiv(p.n_oth, kTile);
    const int64_t split = std::max<int64_t>(1, std::min<int64_t>(pb.cs->n_split > 0 ? pb.cs->n_split : tiles, tiles));
    p.tiles_per_split = static_cast<int>(cdiv(tiles, split));
    p.n_split = static_cast<int>(cdiv(tiles, p.tiles_per_split));
    return p;
  }

  void launch(const TileParams& p, Mode mode) const {
    const unsigned gx = static_cast<unsigned>(cdiv(p.n_own, kTile)), gy = static_cast<unsigned>(p.n_split);
    switch (mode) {
      case Mode::kSoftmaxStats:
        fastcl_emulation::launch(&tile_kernel<Cfg, Mode::kSoftmaxStats>, gx, gy, p, Cfg::kSmem);
        break;
      case Mode::kSoftmaxGrad:
        fastcl_emulation::launch(&tile_kernel<Cfg, Mode::kSoftmaxGrad>, gx, gy, p, Cfg::kSmem);
        break;
      case Mode::kSigmoid:
        fastcl_emulation::launch(&tile_kernel<Cfg, Mode::kSigmoid>, gx, gy, p, Cfg::kSmem);
        break;
    }
  }

  // acc buffer [n_split][rows][ld], zero, as ops.cpp's alloc_acc; summed over splits, cropped
  struct Acc {
    std::vector<A> buf;
    int64_t rows, ld;
  };
  Acc alloc_acc(TileParams& p) const {
    Acc a{{}, cdiv(p.n_own, kTile) * kTile, cdiv(p.d, kAccChunk) * kAccChunk};
    a.buf.assign(static_cast<size_t>(p.n_split * a.rows * a.ld), A(0));
    p.acc = a.buf.data();
    p.acc_ld = a.ld;
    p.acc_split_stride = a.rows * a.ld;
    return a;
  }
  std::vector<double> finish_acc(const Acc& a, const TileParams& p) const {
    std::vector<double> out(static_cast<size_t>(p.n_own) * p.d, 0.0);
    for (int s = 0; s < p.n_split; ++s)
      for (int i = 0; i < p.n_own; ++i)
        for (int x = 0; x < p.d; ++x) out[i * p.d + x] += a.buf[(s * a.rows + i) * a.ld + x];
    return out;
  }

  std::vector<double> stats(bool own_rows, std::vector<double>* pos_sum, std::vector<double>* pos_cnt) const {
    const int n_own = own_rows ? pb.n : pb.c;
    TileParams p = base(own_rows, n_own);
    const size_t size = static_cast<size_t>(p.n_split) * n_own;
    const A nan = std::numeric_limits<A>::quiet_NaN();
    std::vector<A> mx(size, nan), sm(size, nan), ps(size, nan), pc(size, nan);
    p.out0 = mx.data(), p.out1 = sm.data(), p.out_stride = n_own;
    if (pos_sum != nullptr) p.out2 = ps.data(), p.out3 = pc.data();
    launch(p, Mode::kSoftmaxStats);
    std::vector<double> lse(n_own);
    if (pos_sum != nullptr) pos_sum->assign(n_own, 0.0), pos_cnt->assign(n_own, 0.0);
    for (int i = 0; i < n_own; ++i) {  // the merge of ops.cpp
      double top = -kInf;
      for (int s = 0; s < p.n_split; ++s) top = std::max(top, double(mx[s * n_own + i]));
      const double ref = top == -kInf ? 0.0 : top;
      double total = 0;
      for (int s = 0; s < p.n_split; ++s) total += double(sm[s * n_own + i]) * std::exp(double(mx[s * n_own + i]) - ref);
      lse[i] = top + std::log(total);
      if (pos_sum != nullptr)
        for (int s = 0; s < p.n_split; ++s) (*pos_sum)[i] += ps[s * n_own + i], (*pos_cnt)[i] += pc[s * n_own + i];
    }
    return lse;
  }

  std::vector<double> grad(bool own_rows) const {
    const int n_own = own_rows ? pb.n : pb.cs->n_grad_cols;
    TileParams p = base(own_rows, n_own);
    p.lse_row = lse_row.data(), p.w_row = w_row.data();
    p.coef_row = coef_row.data();
    p.lse_col = pb.cs->symmetric ? lse_col.data() : nullptr;
    p.w_col = pb.cs->symmetric ? w_col.data() : nullptr;
    p.accumulate = true;
    Acc a = alloc_acc(p);
    launch(p, Mode::kSoftmaxGrad);
    return finish_acc(a, p);
  }

  std::vector<double> sigmoid(bool own_rows, std::vector<double>* loss, std::vector<double>* gsum) const {
    const int n_own = own_rows ? pb.n : pb.c;
    TileParams p = base(own_rows, n_own);
    p.positive_index = pb.sig_pos.data();
    p.row_labels = p.col_labels = nullptr;  // one-hot positives here (label positives: tests/test_losses.py)
    p.col_has_label = nullptr;
    p.bias = bias.data();
    p.accumulate = true;
    const size_t size = static_cast<size_t>(p.n_split) * n_own;
    std::vector<A> l(size, A(0)), g(size, A(0));
    if (own_rows) p.out0 = l.data(), p.out1 = g.data(), p.out_stride = n_own;
    Acc a = alloc_acc(p);
    launch(p, Mode::kSigmoid);
    if (own_rows) {
      loss->assign(n_own, 0.0), gsum->assign(n_own, 0.0);
      for (int s = 0; s < p.n_split; ++s)
        for (int i = 0; i < n_own; ++i) (*loss)[i] += l[s * n_own + i], (*gsum)[i] += g[s * n_own + i];
    }
    return finish_acc(a, p);
  }
};

template <class Cfg>
int run(const char* config, const Case& cs, double rtol, uint32_t seed) {
  using T = typename Cfg::T;
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  Problem pb;
  pb.cs = &cs, pb.n = cs.n, pb.c = cs.c, pb.d = cs.d;
  const double norm = 1.0 / std::sqrt(double(cs.d));
  for (int i = 0; i < cs.n * cs.d; ++i) pb.q.push_back(to_double(from_double<T>(normal(rng) * norm)));
  for (int i = 0; i < cs.c * cs.d; ++i) pb.k.push_back(to_double(from_double<T>(normal(rng) * norm)));
  for (int i = 0; i < cs.n; ++i) {
    pb.scale.push_back(0.5 + 9.5 * uniform(rng));
    int p = static_cast<int>(uniform(rng) * cs.c) % cs.c;
    if (cs.exclude_self && p == i) p = (p + 1) % cs.c;
    pb.pos.push_back(p);
    pb.row_labels.push_back(static_cast<int64_t>(uniform(rng) * 3));
    pb.sig_pos.push_back(uniform(rng) < 0.2 ? -1 : p);
  }
  for (int j = 0; j < cs.c; ++j) {
    pb.col_labels.push_back(static_cast<int64_t>(uniform(rng) * 3));
    pb.col_has.push_back(uniform(rng) < 0.8);
  }
  pb.bias = -2.0;

  // reference statistics
  std::vector<double> lse_r(cs.n), lse_c(cs.c), psum(cs.n, 0.0), pcnt(cs.n, 0.0);
  std::vector<double> L(static_cast<size_t>(cs.n) * cs.c);
  for (int i = 0; i < cs.n; ++i)
    for (int j = 0; j < cs.c; ++j) L[i * cs.c + j] = pb.logit(i, j);
  for (int i = 0; i < cs.n; ++i) {
    double top = -kInf, total = 0;
    for (int j = 0; j < cs.c; ++j)
      if (pb.in_den(i, j)) top = std::max(top, L[i * cs.c + j]);
    for (int j = 0; j < cs.c; ++j) {
      if (pb.in_den(i, j)) total += std::exp(L[i * cs.c + j] - top);
      if (pb.match(i, j)) psum[i] += L[i * cs.c + j], pcnt[i] += 1;
    }
    lse_r[i] = top == -kInf ? -kInf : top + std::log(total);
  }
  for (int j = 0; j < cs.c; ++j) {
    double top = -kInf, total = 0;
    for (int i = 0; i < cs.n; ++i)
      if (pb.in_den(i, j)) top = std::max(top, L[i * cs.c + j]);
    for (int i = 0; i < cs.n; ++i)
      if (pb.in_den(i, j)) total += std::exp(L[i * cs.c + j] - top);
    lse_c[j] = top == -kInf ? -kInf : top + std::log(total);
  }
  // gradient weights as the backend forms them: finite LSEs, zero weight where invalid
  for (int i = 0; i < cs.n; ++i) {
    const bool ok = std::isfinite(lse_r[i]) && uniform(rng) < 0.9;
    pb.lse_row.push_back(std::isfinite(lse_r[i]) ? lse_r[i] : 0.0);
    pb.w_row.push_back(ok ? 0.5 + uniform(rng) : 0.0);
    pb.coef_row.push_back(ok ? (0.5 + uniform(rng)) / std::max(pcnt[i], 1.0) : 0.0);
  }
  for (int j = 0; j < cs.c; ++j) {
    const bool ok = std::isfinite(lse_c[j]) && uniform(rng) < 0.7;
    pb.lse_col.push_back(std::isfinite(lse_c[j]) ? lse_c[j] : 0.0);
    pb.w_col.push_back(ok ? 0.5 + uniform(rng) : 0.0);
  }
  std::vector<double> dq(static_cast<size_t>(cs.n) * cs.d, 0.0), dk(static_cast<size_t>(cs.n_grad_cols) * cs.d, 0.0);
  std::vector<double> sq(dq.size(), 0.0), sk(static_cast<size_t>(cs.c) * cs.d, 0.0), sloss(cs.n, 0.0), sgsum(cs.n, 0.0);
  for (int i = 0; i < cs.n; ++i)
    for (int j = 0; j < cs.c; ++j) {
      const double x = L[i * cs.c + j];
      double g = 0;
      if (pb.in_den(i, j)) {
        if (pb.w_row[i] != 0) g += pb.w_row[i] * std::exp(x - pb.lse_row[i]);
        if (cs.symmetric && pb.w_col[j] != 0) g += pb.w_col[j] * std::exp(x - pb.lse_col[j]);
      }
      if (pb.positive(i, j)) g -= pb.coef_row[i];
      const bool sig_positive = j == pb.sig_pos[i];
      const double z = x + pb.bias, sg = 1.0 / (1.0 + std::exp(-z)) - (sig_positive ? 1.0 : 0.0);
      const double zz = sig_positive ? -z : z;
      sloss[i] += zz > 0 ? zz + std::log1p(std::exp(-zz)) : std::log1p(std::exp(zz));
      sgsum[i] += sg;
      for (int x2 = 0; x2 < cs.d; ++x2) {
        dq[i * cs.d + x2] += g * pb.k[j * cs.d + x2];
        if (j < cs.n_grad_cols) dk[j * cs.d + x2] += g * pb.scale[i] * pb.q[i * cs.d + x2];
        sq[i * cs.d + x2] += sg * pb.k[j * cs.d + x2];
        sk[j * cs.d + x2] += sg * pb.scale[i] * pb.q[i * cs.d + x2];
      }
    }

  Runner<Cfg> run(pb);
  Report rep;
  const std::string tag = std::string(config) + " " + cs.name + " ";
  std::vector<double> got_psum, got_pcnt;
  rep.check(tag + "row lse", run.stats(true, cs.labels ? &got_psum : nullptr, &got_pcnt), lse_r, rtol);
  if (cs.labels) {
    rep.check(tag + "label pos_sum", got_psum, psum, rtol);
    rep.check(tag + "label pos_cnt", got_pcnt, pcnt, 0.0);
  }
  if (cs.symmetric) rep.check(tag + "col lse", run.stats(false, nullptr, nullptr), lse_c, rtol);
  rep.check(tag + "dq acc", run.grad(true), dq, rtol);
  rep.check(tag + "dk acc", run.grad(false), dk, rtol);
  std::vector<double> got_loss, got_gsum;
  rep.check(tag + "sigmoid dq acc", run.sigmoid(true, &got_loss, &got_gsum), sq, rtol);
  rep.check(tag + "sigmoid loss rows", got_loss, sloss, rtol);
  rep.check(tag + "sigmoid gsum rows", got_gsum, sgsum, rtol);
  rep.check(tag + "sigmoid dk acc", run.sigmoid(false, nullptr, nullptr), sk, rtol);
  return rep.failures;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  int failures = 0;
  uint32_t seed = 1234;
  for (const Case& cs : kCases) {
    ++seed;
    if (only.empty() || only == "fp64") failures += run<ConfigFp64>("fp64", cs, 1e-12, seed);
    if (only.empty() || only == "fp32") failures += run<ConfigFp32>("fp32", cs, 2e-5, seed);
    if (only.empty() || only == "tf32") failures += run<ConfigTf32>("tf32", cs, 2e-2, seed);
    if (only.empty() || only == "bf16") failures += run<ConfigBf16>("bf16", cs, 2e-2, seed);
    if (only.empty() || only == "fp16") failures += run<ConfigFp16>("fp16", cs, 5e-3, seed);
  }
  std::printf("%d failed checks\n", failures);
  return failures == 0 ? 0 : 1;
}
