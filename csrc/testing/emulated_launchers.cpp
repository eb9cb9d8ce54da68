// The launchers of params.h with the kernels run on CPU threads (emulate.h). Linked with ops.cpp
// and bindings.cpp built with -DFASTCL_EMULATION_HOST, this gives an extension whose entry points
// take CPU tensors: tests/test_cuda.py builds it to run the whole variant matrix through the
// real host glue and kernel code on a machine without a GPU.
#include "emulate.h"

#include "../tile_kernels.cuh"

namespace fastcl {
namespace {

template <class Cfg>
cudaError_t emulate(const TileParams& p, Mode mode) {
  if (p.n_own <= 0 || p.n_split <= 0) return cudaSuccess;
  const unsigned gx = static_cast<unsigned>((p.n_own + kTile - 1) / kTile), gy = static_cast<unsigned>(p.n_split);
  switch (mode) {
    case Mode::kSoftmaxStats:
      fastcl_emulation::launch(&tile_kernel<Cfg, Mode::kSoftmaxStats>, gx, gy, p, Cfg::kSmem);
      return cudaSuccess;
    case Mode::kSoftmaxGrad:
      fastcl_emulation::launch(&tile_kernel<Cfg, Mode::kSoftmaxGrad>, gx, gy, p, Cfg::kSmem);
      return cudaSuccess;
    case Mode::kSigmoid:
      fastcl_emulation::launch(&tile_kernel<Cfg, Mode::kSigmoid>, gx, gy, p, Cfg::kSmem);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_tile_fp16(const TileParams& p, Mode mode, cudaStream_t) { return emulate<ConfigFp16>(p, mode); }
cudaError_t launch_tile_bf16(const TileParams& p, Mode mode, cudaStream_t) { return emulate<ConfigBf16>(p, mode); }
cudaError_t launch_tile_fp32(const TileParams& p, Mode mode, cudaStream_t) { return emulate<ConfigFp32>(p, mode); }
cudaError_t launch_tile_tf32(const TileParams& p, Mode mode, cudaStream_t) { return emulate<ConfigTf32>(p, mode); }
cudaError_t launch_tile_fp64(const TileParams& p, Mode mode, cudaStream_t) { return emulate<ConfigFp64>(p, mode); }

}  // namespace fastcl
