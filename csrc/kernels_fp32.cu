// Tile kernels for float32 inputs, exact: fp32 FMAs on CUDA cores.
// One .cu per input type so the instantiations compile in parallel.
#include "tile_kernels.cuh"

namespace fastcl {

cudaError_t launch_tile_fp32(const TileParams& p, Mode mode, cudaStream_t stream) {
  return launch_config<ConfigFp32>(p, mode, stream);
}

}  // namespace fastcl
