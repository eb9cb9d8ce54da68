// Tile kernels for float32 inputs with TF32 allowed: WMMA m16n16k8 tf32 tensor cores, fp32 accumulation.
// One .cu per input type so the instantiations compile in parallel.
#include "tile_kernels.cuh"

namespace fastcl {

cudaError_t launch_tile_tf32(const TileParams& p, Mode mode, cudaStream_t stream) {
  return launch_config<ConfigTf32>(p, mode, stream);
}

}  // namespace fastcl
