// Block-wide reductions and launch limits shared by the CUDA kernels.
#pragma once

#include <cstdint>

namespace i2x {
namespace cuda {

constexpr int64_t kMaxGrid = int64_t{1} << 20;  // grid-stride loops beyond this many blocks

template <typename T>
__device__ __forceinline__ T warp_allsum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024) and
// blockDim.y == 1; every thread of the block must call it (it synchronises).
template <typename T>
__device__ __forceinline__ T block_allsum(T v, T* smem /* >= 32 */) {
  v = warp_allsum(v);
  if (blockDim.x > 32) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();  // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? smem[lane] : T(0);
    v = warp_allsum(v);
  }
  return v;
}

}  // namespace cuda
}  // namespace i2x
