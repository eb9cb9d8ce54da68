// Tile kernels for float64 inputs: fp64 FMAs on CUDA cores.
// One .cu per input type so the instantiations compile in parallel.
#include "tile_kernels.cuh"

namespace fastcl {

cudaError_t launch_tile_fp64(const TileParams& p, Mode mode, cudaStream_t stream) {
  return launch_config<ConfigFp64>(p, mode, stream);
}

}  // namespace fastcl
