// Run csrc/tile_kernels.cuh on the CPU, for tests on machines without a GPU.
//
// Include this before tile_kernels.cuh in a host-only C++20 program (g++/clang++ with the CUDA
// include directory on the path). Each block runs as kThreads std::threads: __syncthreads is a
// std::barrier over the block, __shfl_xor_sync an exchange through memory between two warp
// barriers, static __shared__ arrays are function statics (blocks run one after another), and
// nvcuda::wmma is a model of the documented fragment semantics in which every lane holds the
// whole 16 x 16 tile (load/store/mma per the row_major / col_major definitions; lane 0 stores).
// What it checks: indexing, masks, tails, barriers, splits, the epilogues and the
// read-modify-write accumulator. What it cannot: real fragment layouts, timing, races that the
// barriers of this model happen to order, the hardware's rounding of tensor-core sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#define FASTCL_EMULATION 1
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;

namespace fastcl_emulation {

constexpr int kBlockThreads = 128;  // fastcl::kThreads (checked by a static_assert in the harness)

struct Block {
  std::barrier<> all{kBlockThreads};
  std::barrier<> warp[kBlockThreads / 32]{std::barrier<>(32), std::barrier<>(32), std::barrier<>(32),
                                          std::barrier<>(32)};
  unsigned char exchange[kBlockThreads][8];
};

inline Block* current = nullptr;
alignas(128) inline unsigned char shared_memory[256 * 1024];

}  // namespace fastcl_emulation

inline void __syncthreads() { fastcl_emulation::current->all.arrive_and_wait(); }

template <typename V>
V __shfl_xor_sync(unsigned /*mask: the kernels always pass the full warp*/, V value, int lane_mask) {
  static_assert(sizeof(V) <= 8, "exchange slots hold 8 bytes");
  auto* block = fastcl_emulation::current;
  const int t = threadIdx.x, w = t / 32;
  std::memcpy(block->exchange[t], &value, sizeof(V));
  block->warp[w].arrive_and_wait();
  V other;
  std::memcpy(&other, block->exchange[(t & ~31) | ((t & 31) ^ lane_mask)], sizeof(V));
  block->warp[w].arrive_and_wait();
  return other;
}

inline unsigned char* dynamic_smem() { return fastcl_emulation::shared_memory; }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  typename storage<T>::type x[kRows * kCols];
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// matrix_a / matrix_b: element (r, c) of the R x C operand at p[r * ldm + c] (row_major) or
// p[c * ldm + r] (col_major)
template <class Use, int M, int N, int K, class T, class Layout, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators take a layout argument");
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if ((threadIdx.x & 31) != 0) return;  // every lane holds the same tile: one writes it
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

template <class F, class V>
void fill_fragment(F& f, V v) {
  for (int i = 0; i < F::num_elements; ++i) f.x[i] = v;
}

template <int M, int N, int K, class FA, class FB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const FA& a, const FB& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = c.x[m * N + n];
      for (int k = 0; k < K; ++k) s += as_float(a.x[m * K + k]) * as_float(b.x[k * N + n]);
      out[m * N + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

inline float __float_to_tf32(float v) {  // round to a 10-bit mantissa (nearest, ties away)
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace wmma
}  // namespace nvcuda

namespace fastcl_emulation {

// Launch kernel(params) on grid (gx, gy) of kBlockThreads-thread blocks, one block at a time.
// Shared memory starts as 0xff bytes (NaN for floats) so reads of unwritten entries show.
template <class Params>
void launch(void (*kernel)(Params), unsigned gx, unsigned gy, const Params& params, size_t smem_bytes) {
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      Block block;
      current = &block;
      std::memset(shared_memory, 0xff, smem_bytes);
      std::vector<std::thread> threads;
      threads.reserve(kBlockThreads);
      for (unsigned t = 0; t < kBlockThreads; ++t) {
        threads.emplace_back([&, t] {
          threadIdx = make_uint3(t, 0, 0);
          blockIdx = make_uint3(bx, by, 0);
          kernel(params);
        });
      }
      for (auto& th : threads) th.join();
      current = nullptr;
    }
  }
}

}  // namespace fastcl_emulation
