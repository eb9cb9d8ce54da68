// The tile kernel behind every CUDA op of fastcl: one loop over (owner tile x other tile) of
// S = Q K^T with three epilogues (docs/design.md §2). Plain CUDA: no torch headers (docs/design.md §8).
//
// Structure of one block (kThreads = 128 threads = 4 warps; kTile = 64):
//   * it owns kTile consecutive lines of one side ("owner": query rows, or key columns when
//     !own_rows) and walks the other side's tiles of its split (blockIdx.y);
//   * per other tile: S[64 x 64] is accumulated over D in chunks of BK (operands staged in
//     shared memory, zero-padded past N, C and D), each warp owning 16 owner lines x 64;
//   * S goes to shared memory (fp32, fp64 for fp64 inputs) and an element-wise epilogue runs
//     with thread t on owner line t/2 and the other-side entries t%2, t%2 + 2, ...: so per-line
//     state (running max / sum, label sums, sigmoid sums) stays in registers of two threads;
//   * gradient modes stage G[64 x 64] in shared memory (in the MMA input type) and add
//     G . other[:, x0:x0+64] into the block's own rows of a zero-initialised fp32 accumulator
//     in global memory, chunk by chunk over D (read-modify-write, L2-resident).
//
// Large D (docs/design.md §7): S is built once per tile whatever D is, and the dQ/dK accumulator never
// has to fit on chip: the block owns acc[64, D] in global memory and updates it once per other
// tile, 64 columns of D at a time, through WMMA accumulator fragments. Extra traffic per other
// tile: 64 x D x 8 bytes (read + write fp32) against 4 x 64 x 64 x D FLOPs, i.e. 32 FLOP/B of
// L2 traffic; the block's slice (64 x 768 x 4 B = 192 KB at D = 768) stays in L2 between tiles.
// The alternatives -- registers (BM x D fp32 does not fit beyond D ~ 256) or splitting D over
// blocks (S rebuilt D/64 times) -- are the ones to measure against on a GPU:
//   TODO(gpu): time fwd+bwd at D in {256, 768, 1024, 4096}, bf16, N = C = 4096..32768, against
//   (a) this global read-modify-write, (b) a D-split grid with S recomputed per 128/256 chunk,
//   (c) an accumulator in shared memory for D <= 512 (64 x 512 x 4 = 128 KB); and check
//   `-Xptxas -v` (no spills) and Nsight's L2 hit rate for the acc traffic.
//
// Determinism: no atomics. Every output element has one owner block and one owner warp lane;
// splits of the other side write separate partial buffers that the host reduces in a fixed order.
//
// Numerics: products of fp16/bf16 inputs on tensor cores (WMMA m16n16k16, fp32 accumulate);
// fp32 inputs either on tensor cores through TF32 (when the caller allows TF32) or exact on
// CUDA cores; fp64 on CUDA cores in fp64. Statistics and G are fp32 (fp64), G is rounded to the
// input type for the tensor-core product G . K, as in FlashAttention -- after the target terms
// (-t_ij on positives, SigLIP's -1) are in it, so a confident positive's G ~ 0 stays small.
//
// Without a GPU: csrc/testing/emulate.h runs this file on CPU threads (tests/test_cuda.py).
//
// Performance notes (unmeasured): no cp.async / TMA pipelining, no wgmma; the owner chunk is
// restaged for every other tile; the fp32-exact path is bound by shared-memory loads (one LDS
// per FMA). These are the first things to change once timings exist.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifndef FASTCL_EMULATION  // csrc/testing/emulate.h runs these kernels on CPU threads with a model of WMMA
#include <mma.h>
#endif

#include "params.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastcl's CUDA kernels need sm_80 or newer (bf16 and tf32 tensor cores); set FASTCL_CUDA_ARCH"
#endif

namespace fastcl {

namespace wmma = nvcuda::wmma;

#ifndef FASTCL_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
}
#endif

static_assert(kThreads == 2 * kTile, "the epilogue maps two threads to each owner line");
static_assert(kTile == 64 && kThreads == 128, "four warps of 16 owner lines each");

// ---------------------------------------------------------------------------------------------
// Scalars

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename To> __device__ __forceinline__ To from_acc(float x);
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(float x) { return x; }
template <typename To> __device__ __forceinline__ To from_acc(double x) { return x; }

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }
template <typename A> __device__ __forceinline__ A quiet_nan() { return static_cast<A>(NAN); }

// softplus(x) = log(1 + e^x) without overflow; NaN stays NaN (no fmax, which drops NaN)
template <typename A> __device__ __forceinline__ A softplus(A x) {
  return x > A(0) ? x + log1p_(exp_(-x)) : log1p_(exp_(x));
}

template <typename A> __device__ __forceinline__ A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + exp_(-x));
  const A e = exp_(x);
  return e / (A(1) + e);
}

// Merge partial (m2, l2) into (m, l), both "l = sum exp(x - m)" over disjoint sets; an empty
// set is (-inf, 0). NaN in either propagates (inputs with NaN give a NaN loss).
template <typename A> __device__ __forceinline__ void merge_lse(A& m, A& l, A m2, A l2) {
  if (m != m || m2 != m2) {
    m = l = quiet_nan<A>();
    return;
  }
  const A mn = m > m2 ? m : m2;
  if (mn == neg_inf<A>()) {
    l = A(0);
    return;
  }
  l = (m == neg_inf<A>() ? A(0) : l * exp_(m - mn)) + (m2 == neg_inf<A>() ? A(0) : l2 * exp_(m2 - mn));
  m = mn;
}

// ---------------------------------------------------------------------------------------------
// Warp-level tile products. A warp owns a strip of 16 lines x (16 * NF) columns as NF
// accumulator fragments:
//   strip_nt: C += A[16 x K] . B^T,  B stored as [16 NF x K] rows (both row-major, ld in elements)
//   strip_nn: C += A[16 x K] . B,    B stored as [K x 16 NF] row-major
// load/store move accumulators between fragments and row-major Acc memory (shared or global).

template <typename T>  // __half or __nv_bfloat16
struct WmmaHalf {
  static constexpr int kStep = 16;
  using Frag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  __device__ static void zero(Frag& c) { wmma::fill_fragment(c, 0.0f); }

  template <int NF, int K>
  __device__ static void strip_nt(Frag (&c)[NF], const T* a, int lda, const T* b, int ldb) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
#pragma unroll
    for (int k = 0; k < K; k += kStep) {
      wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
      for (int n = 0; n < NF; ++n) {
        wmma::load_matrix_sync(fb, b + n * 16 * ldb + k, ldb);  // element (k, n) at b[n * ldb + k]
        wmma::mma_sync(c[n], fa, fb, c[n]);
      }
    }
  }

  template <int NF, int K>
  __device__ static void strip_nn(Frag (&c)[NF], const T* a, int lda, const T* b, int ldb) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
#pragma unroll
    for (int k = 0; k < K; k += kStep) {
      wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
      for (int n = 0; n < NF; ++n) {
        wmma::load_matrix_sync(fb, b + k * ldb + n * 16, ldb);
        wmma::mma_sync(c[n], fa, fb, c[n]);
      }
    }
  }

  __device__ static void store(float* p, int64_t ld, const Frag& c) {
    wmma::store_matrix_sync(p, c, static_cast<unsigned>(ld), wmma::mem_row_major);
  }
  __device__ static void load(Frag& c, const float* p, int64_t ld) {
    wmma::load_matrix_sync(c, p, static_cast<unsigned>(ld), wmma::mem_row_major);
  }
};

struct WmmaTf32 {  // float inputs, rounded to TF32 (10-bit mantissa) in the fragments
  static constexpr int kStep = 8;
  using Frag = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

  template <typename F> __device__ static void round_tf32(F& f) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
  }

  __device__ static void zero(Frag& c) { wmma::fill_fragment(c, 0.0f); }

  template <int NF, int K>
  __device__ static void strip_nt(Frag (&c)[NF], const float* a, int lda, const float* b, int ldb) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
#pragma unroll
    for (int k = 0; k < K; k += kStep) {
      wmma::load_matrix_sync(fa, a + k, lda);
      round_tf32(fa);
#pragma unroll
      for (int n = 0; n < NF; ++n) {
        wmma::load_matrix_sync(fb, b + n * 16 * ldb + k, ldb);
        round_tf32(fb);
        wmma::mma_sync(c[n], fa, fb, c[n]);
      }
    }
  }

  template <int NF, int K>
  __device__ static void strip_nn(Frag (&c)[NF], const float* a, int lda, const float* b, int ldb) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
#pragma unroll
    for (int k = 0; k < K; k += kStep) {
      wmma::load_matrix_sync(fa, a + k, lda);
      round_tf32(fa);
#pragma unroll
      for (int n = 0; n < NF; ++n) {
        wmma::load_matrix_sync(fb, b + k * ldb + n * 16, ldb);
        round_tf32(fb);
        wmma::mma_sync(c[n], fa, fb, c[n]);
      }
    }
  }

  __device__ static void store(float* p, int64_t ld, const Frag& c) {
    wmma::store_matrix_sync(p, c, static_cast<unsigned>(ld), wmma::mem_row_major);
  }
  __device__ static void load(Frag& c, const float* p, int64_t ld) {
    wmma::load_matrix_sync(c, p, static_cast<unsigned>(ld), wmma::mem_row_major);
  }
};

// Exact products on CUDA cores (fp32, fp64) behind the same interface. Fragment layout of a
// 16 x 16 tile: lane l holds row l / 2, columns 8 * (l % 2) .. + 7.
template <typename T, typename A>
struct Simt {
  struct Frag {
    A v[8];
  };

  __device__ static int row() { return (threadIdx.x & 31) >> 1; }
  __device__ static int col() { return (threadIdx.x & 1) * 8; }

  __device__ static void zero(Frag& c) {
#pragma unroll
    for (int v = 0; v < 8; ++v) c.v[v] = A(0);
  }

  template <int NF, int K, typename TA>
  __device__ static void strip_nt(Frag (&c)[NF], const TA* a, int lda, const T* b, int ldb) {
    const int r = row(), c0 = col();
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const A av = to_acc(a[r * lda + k]);
#pragma unroll
      for (int n = 0; n < NF; ++n)
#pragma unroll
        for (int v = 0; v < 8; ++v) c[n].v[v] += av * to_acc(b[(n * 16 + c0 + v) * ldb + k]);
    }
  }

  template <int NF, int K, typename TA>
  __device__ static void strip_nn(Frag (&c)[NF], const TA* a, int lda, const T* b, int ldb) {
    const int r = row(), c0 = col();
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const A av = to_acc(a[r * lda + k]);
#pragma unroll
      for (int n = 0; n < NF; ++n)
#pragma unroll
        for (int v = 0; v < 8; ++v) c[n].v[v] += av * to_acc(b[k * ldb + n * 16 + c0 + v]);
    }
  }

  __device__ static void store(A* p, int64_t ld, const Frag& c) {
    const int r = row(), c0 = col();
#pragma unroll
    for (int v = 0; v < 8; ++v) p[r * ld + c0 + v] = c.v[v];
  }
  __device__ static void load(Frag& c, const A* p, int64_t ld) {
    const int r = row(), c0 = col();
#pragma unroll
    for (int v = 0; v < 8; ++v) c.v[v] = p[r * ld + c0 + v];
  }
};

// ---------------------------------------------------------------------------------------------
// Configurations: input type T, accumulation type A, staging type G of the gradient tile, the
// warp product, and the D-chunk BK of the S loop. Shared-memory rows are padded by 16 bytes
// (keeps WMMA's 16-byte ldm rule and 32-byte fragment alignment, and staggers banks).

template <typename T_, typename A_, typename G_, typename Mma_, int BK_>
struct Config {
  using T = T_;
  using A = A_;
  using G = G_;
  using Mma = Mma_;
  static constexpr int BK = BK_;
  static constexpr int BX = kAccChunk;
  static constexpr int LDK = BK + 16 / int(sizeof(T));     // staged Q/K chunk rows
  static constexpr int LDX = BX + 16 / int(sizeof(T));     // staged other-side chunk for G . X
  static constexpr int LDG = kTile + 16 / int(sizeof(G));  // staged G rows
  static constexpr int LDS = kTile + 16 / int(sizeof(A));  // S rows
  static constexpr size_t round128(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t max_(size_t a, size_t b) { return a > b ? a : b; }
  // region 1: the two operand chunks of S, later G; region 2: S, later the other-side chunk
  static constexpr size_t kRegion1 = round128(max_(2 * kTile * LDK * sizeof(T), kTile * LDG * sizeof(G)));
  static constexpr size_t kRegion2 = round128(max_(kTile * LDS * sizeof(A), kTile * LDX * sizeof(T)));
  static constexpr size_t kSmem = kRegion1 + kRegion2;
  static_assert(BK % 16 == 0 && BX % 16 == 0, "chunks are whole fragments");
};

using ConfigFp16 = Config<__half, float, __half, WmmaHalf<__half>, 64>;
using ConfigBf16 = Config<__nv_bfloat16, float, __nv_bfloat16, WmmaHalf<__nv_bfloat16>, 64>;
using ConfigTf32 = Config<float, float, float, WmmaTf32, 32>;
using ConfigFp32 = Config<float, float, float, Simt<float, float>, 32>;
using ConfigFp64 = Config<double, double, double, Simt<double, double>, 32>;

// ---------------------------------------------------------------------------------------------
// Staging: rows [row0, row0 + kTile) x columns [col0, col0 + W) of a row-major [nrows, ncols]
// matrix into shared memory with row stride LD, zeros outside. 16-byte loads when every row
// start is 16-byte aligned (vec), else one element per load.

template <typename T, int W, int LD>
__device__ __forceinline__ void stage(T* s, const T* g, int row0, int nrows, int col0, int ncols, bool vec) {
  constexpr int V = 16 / sizeof(T);
  static_assert(W % V == 0, "chunk width is a whole number of 16-byte vectors");
  if (vec) {
    constexpr int kPerRow = W / V;
    for (int idx = threadIdx.x; idx < kTile * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow, c = (idx % kPerRow) * V;
      const int gr = row0 + r, gc = col0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      // ncols % V == 0 here, so gc < ncols implies the whole vector is inside the row
      if (gr < nrows && gc < ncols) v = *reinterpret_cast<const uint4*>(g + static_cast<int64_t>(gr) * ncols + gc);
      *reinterpret_cast<uint4*>(s + r * LD + c) = v;
    }
  } else {
    const T zero = from_acc<T>(0.0f);
    for (int idx = threadIdx.x; idx < kTile * W; idx += kThreads) {
      const int r = idx / W, c = idx % W;
      const int gr = row0 + r, gc = col0 + c;
      s[r * LD + c] = (gr < nrows && gc < ncols) ? g[static_cast<int64_t>(gr) * ncols + gc] : zero;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel.

template <class Cfg, Mode MODE>
__global__ void __launch_bounds__(kThreads) tile_kernel(const TileParams p) {
  using T = typename Cfg::T;
  using A = typename Cfg::A;
  using G = typename Cfg::G;
  using Mma = typename Cfg::Mma;
  using Frag = typename Mma::Frag;
  constexpr int BK = Cfg::BK, BX = Cfg::BX, LDK = Cfg::LDK, LDX = Cfg::LDX, LDG = Cfg::LDG, LDS = Cfg::LDS;
  constexpr int NF = kTile / 16;   // fragments across a 64-wide strip
  constexpr int NFX = BX / 16;     // fragments across a D-chunk of the accumulator

  unsigned char* smem = dynamic_smem();
  T* s_own = reinterpret_cast<T*>(smem);                    // region 1: [kTile][LDK]
  T* s_oth = s_own + kTile * LDK;                           //           [kTile][LDK]
  G* s_g = reinterpret_cast<G*>(smem);                      // region 1: [kTile][LDG]
  A* s_s = reinterpret_cast<A*>(smem + Cfg::kRegion1);      // region 2: [kTile][LDS]
  T* s_x = reinterpret_cast<T*>(smem + Cfg::kRegion1);      // region 2: [kTile][LDX]

  // per-tile metadata: "row" arrays are indexed by the query row of an entry, "col" arrays by
  // its key column, whichever side owns the block
  __shared__ A m_scale[kTile];
  __shared__ int64_t m_pos[kTile];
  __shared__ int64_t m_row_label[kTile];
  __shared__ int64_t m_col_label[kTile];
  __shared__ bool m_col_has[kTile];
  __shared__ A m_row_lse[kTile], m_row_w[kTile], m_row_coef[kTile];
  __shared__ A m_col_lse[kTile], m_col_w[kTile];

  const int tid = threadIdx.x, warp = tid / 32;
  const int o0 = blockIdx.x * kTile;
  const int n_tiles = (p.n_oth + kTile - 1) / kTile;
  const int t_begin = blockIdx.y * p.tiles_per_split;
  const int t_end = n_tiles < t_begin + p.tiles_per_split ? n_tiles : t_begin + p.tiles_per_split;
  const T* own = static_cast<const T*>(p.own);
  const T* oth = static_cast<const T*>(p.oth);
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.d % V == 0 && reinterpret_cast<uintptr_t>(own) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(oth) % 16 == 0;
  const bool labels = p.row_labels != nullptr;
  const bool symmetric = p.lse_col != nullptr;
  const A gmul = p.g_mul != nullptr ? *static_cast<const A*>(p.g_mul) : A(1);
  const A bias = p.bias != nullptr ? *static_cast<const A*>(p.bias) : A(0);

  // epilogue ownership: owner line r, other-side entries h, h + 2, ..., h + 62
  const int r = tid >> 1, h = tid & 1;
  A st0 = MODE == Mode::kSoftmaxStats ? neg_inf<A>() : A(0);  // running max | sum softplus
  A st1 = A(0);                                              // running sum exp | sum sigmoid
  A st2 = A(0), st3 = A(0);                                  // label-positive sum, count

  for (int tt = t_begin; tt < t_end; ++tt) {
    const int t0 = tt * kTile;
    const int row0 = p.own_rows ? o0 : t0;  // first query row / key column of the tile
    const int col0 = p.own_rows ? t0 : o0;
    const int n_rows = p.own_rows ? p.n_own : p.n_oth;
    const int n_cols = p.own_rows ? p.n_oth : p.n_own;

    // ---- S = own[o0:+64] . oth[t0:+64]^T over D
    Frag sacc[NF];
#pragma unroll
    for (int n = 0; n < NF; ++n) Mma::zero(sacc[n]);
    for (int k0 = 0; k0 < p.d; k0 += BK) {
      __syncthreads();  // the previous users of region 1 (and of the metadata) are done
      stage<T, BK, LDK>(s_own, own, o0, p.n_own, k0, p.d, vec);
      stage<T, BK, LDK>(s_oth, oth, t0, p.n_oth, k0, p.d, vec);
      if (k0 == 0) {
        if (tid < kTile) {
          const int i = row0 + tid;
          const bool ok = i < n_rows;
          m_scale[tid] = ok ? static_cast<const A*>(p.scale)[i] : A(0);
          m_pos[tid] = (ok && p.positive_index != nullptr) ? p.positive_index[i] : int64_t(-1);
          m_row_label[tid] = (ok && labels) ? p.row_labels[i] : int64_t(0);
          if (MODE == Mode::kSoftmaxGrad) {
            m_row_lse[tid] = ok ? static_cast<const A*>(p.lse_row)[i] : A(0);
            m_row_w[tid] = ok ? static_cast<const A*>(p.w_row)[i] : A(0);
            m_row_coef[tid] = (ok && p.coef_row != nullptr) ? static_cast<const A*>(p.coef_row)[i] : A(0);
          }
        } else {
          const int c = tid - kTile, j = col0 + c;
          const bool ok = j < n_cols;
          m_col_label[c] = (ok && labels) ? p.col_labels[j] : int64_t(0);
          m_col_has[c] = ok && (p.col_has_label == nullptr || p.col_has_label[j]);
          if (MODE == Mode::kSoftmaxGrad) {
            m_col_lse[c] = (ok && symmetric) ? static_cast<const A*>(p.lse_col)[j] : A(0);
            m_col_w[c] = (ok && symmetric) ? static_cast<const A*>(p.w_col)[j] : A(0);
          }
        }
      }
      __syncthreads();
      Mma::template strip_nt<NF, BK>(sacc, s_own + warp * 16 * LDK, LDK, s_oth, LDK);
    }
    // region 2 was last read (as s_x) before the first barrier of the loop above
#pragma unroll
    for (int n = 0; n < NF; ++n) Mma::store(s_s + warp * 16 * LDS + n * 16, LDS, sacc[n]);
    __syncthreads();

    // ---- epilogue: thread (r, h) visits S[r][c], c = h, h + 2, ...
    const bool own_ok = o0 + r < p.n_own;
    for (int c = h; c < kTile; c += 2) {
      const bool valid = own_ok && t0 + c < p.n_oth;
      const int il = p.own_rows ? r : c;  // local query row
      const int jl = p.own_rows ? c : r;  // local key column
      const int64_t i = row0 + il, j = col0 + jl;
      A x = s_s[r * LDS + c] * m_scale[il];

      if (MODE == Mode::kSigmoid) {
        // z = +1 on the row's positive, -1 elsewhere: loss softplus(-z x), G = sigmoid(x) - [z = 1],
        // both formed here in fp32 so that a confident positive's G ~ 0 is not the difference
        // of two rounded numbers
        A g = A(0);
        if (valid) {
          x += bias;
          const bool positive = labels ? m_row_label[il] == m_col_label[jl] : j == m_pos[il];
          st0 += softplus(positive ? -x : x);
          const A sg = positive ? -sigmoid(-x) : sigmoid(x);
          st1 += sg;
          g = p.own_rows ? sg : sg * m_scale[il];
        }
        s_g[r * LDG + c] = from_acc<G>(g);
        continue;
      }

      const bool excluded = p.exclude_self && i + p.row_offset == j;
      const bool match = labels && valid && !excluded && m_row_label[il] == m_col_label[jl] && m_col_has[jl];
      const bool positive = labels ? match : j == m_pos[il];
      const bool in_den = valid && !excluded && !(p.decoupled && positive);

      if (MODE == Mode::kSoftmaxStats) {
        if (in_den && x != neg_inf<A>()) {  // online (max, sum exp) of this thread's entries
          if (x > st0) {
            st1 = st1 * exp_(st0 - x) + A(1);
            st0 = x;
          } else if (x <= st0) {
            st1 += exp_(x - st0);
          } else {  // x or the running max is NaN
            st0 = st1 = quiet_nan<A>();
          }
        }
        if (match) {
          st2 += x;
          st3 += A(1);
        }
      } else {  // kSoftmaxGrad
        A g = A(0);
        if (in_den) {
          const A wr = m_row_w[il];
          if (wr != A(0)) g = wr * exp_(x - m_row_lse[il]);
          if (symmetric) {
            const A wc = m_col_w[jl];
            if (wc != A(0)) g += wc * exp_(x - m_col_lse[jl]);
          }
        }
        if (positive && valid) g -= m_row_coef[il];  // the target term, before G is rounded
        g *= gmul;
        if (!p.own_rows) g *= m_scale[il];  // dK_j = sum_i G_ij s_i q_i
        s_g[r * LDG + c] = from_acc<G>(g);
      }
    }

    // ---- the chunked pass: the staged G tile to g_out, row by row (coalesced)
    if (MODE != Mode::kSoftmaxStats && p.g_out != nullptr) {
      __syncthreads();  // G is complete
      G* g_out = static_cast<G*>(p.g_out);
      for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
        const int rr = idx / kTile, cc = idx % kTile;
        if (o0 + rr < p.n_own && t0 + cc < p.n_oth)
          g_out[static_cast<int64_t>(o0 + rr) * p.g_ld + t0 + cc] = s_g[rr * LDG + cc];
      }
    }

    // ---- acc[o0:+64, :] += G . oth[t0:+64, :], one D-chunk of BX columns at a time
    if (MODE != Mode::kSoftmaxStats && p.accumulate) {
      A* acc = static_cast<A*>(p.acc) + blockIdx.y * p.acc_split_stride +
               static_cast<int64_t>(o0 + warp * 16) * p.acc_ld;
      for (int x0 = 0; x0 < p.d; x0 += BX) {
        __syncthreads();  // G is complete; S (then the previous chunk) is no longer read
        stage<T, BX, LDX>(s_x, oth, t0, p.n_oth, x0, p.d, vec);
        __syncthreads();
        Frag xacc[NFX];
#pragma unroll
        for (int n = 0; n < NFX; ++n) Mma::load(xacc[n], acc + x0 + n * 16, p.acc_ld);
        Mma::template strip_nn<NFX, kTile>(xacc, s_g + warp * 16 * LDG, LDG, s_x, LDX);
#pragma unroll
        for (int n = 0; n < NFX; ++n) Mma::store(acc + x0 + n * 16, p.acc_ld, xacc[n]);
      }
    }
    // the next tile's first barrier orders these reads of region 1 and 2 before their reuse
  }

  // ---- per-line outputs: combine the two threads of each owner line
  if (MODE == Mode::kSoftmaxStats) {
    const A m2 = __shfl_xor_sync(0xffffffffu, st0, 1);
    const A l2 = __shfl_xor_sync(0xffffffffu, st1, 1);
    merge_lse(st0, st1, m2, l2);
    st2 += __shfl_xor_sync(0xffffffffu, st2, 1);
    st3 += __shfl_xor_sync(0xffffffffu, st3, 1);
    if (h == 0 && o0 + r < p.n_own) {
      const int64_t at = blockIdx.y * p.out_stride + o0 + r;
      static_cast<A*>(p.out0)[at] = st0;
      static_cast<A*>(p.out1)[at] = st1;
      if (p.out2 != nullptr) static_cast<A*>(p.out2)[at] = st2;
      if (p.out3 != nullptr) static_cast<A*>(p.out3)[at] = st3;
    }
  } else if (MODE == Mode::kSigmoid) {
    st0 += __shfl_xor_sync(0xffffffffu, st0, 1);
    st1 += __shfl_xor_sync(0xffffffffu, st1, 1);
    if (h == 0 && o0 + r < p.n_own && p.out0 != nullptr) {
      const int64_t at = blockIdx.y * p.out_stride + o0 + r;
      static_cast<A*>(p.out0)[at] = st0;
      static_cast<A*>(p.out1)[at] = st1;
    }
  }
}

#ifndef FASTCL_EMULATION
// ---------------------------------------------------------------------------------------------
// Host-side launch of one configuration.

template <class Cfg, Mode MODE>
cudaError_t launch_mode(const TileParams& p, cudaStream_t stream) {
  auto kernel = tile_kernel<Cfg, MODE>;
  constexpr size_t smem = Cfg::kSmem;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.n_own + kTile - 1) / kTile, p.n_split);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <class Cfg>
cudaError_t launch_config(const TileParams& p, Mode mode, cudaStream_t stream) {
  if (p.n_own <= 0 || p.n_split <= 0) return cudaSuccess;
  switch (mode) {
    case Mode::kSoftmaxStats: return launch_mode<Cfg, Mode::kSoftmaxStats>(p, stream);
    case Mode::kSoftmaxGrad: return launch_mode<Cfg, Mode::kSoftmaxGrad>(p, stream);
    case Mode::kSigmoid: return launch_mode<Cfg, Mode::kSigmoid>(p, stream);
  }
  return cudaErrorInvalidValue;
}
#endif  // FASTCL_EMULATION

}  // namespace fastcl
