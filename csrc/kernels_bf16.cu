// Tile kernels for bfloat16 inputs: WMMA m16n16k16 tensor cores, fp32 accumulation.
// One .cu per input type so the instantiations compile in parallel.
#include "tile_kernels.cuh"

namespace fastcl {

cudaError_t launch_tile_bf16(const TileParams& p, Mode mode, cudaStream_t stream) {
  return launch_config<ConfigBf16>(p, mode, stream);
}

}  // namespace fastcl
