// saliency_pool on CUDA: out[b, c] = sum_p F[b, c, p] s[b, p] / sum_p s[b, p] (0 where the
// saliency sums to 0), never materialising F * s.
//
// Two deterministic kernels (no atomics):
//   1. saliency_total_kernel: one block per image sums s[b, :] into a [B] opmath buffer, so the
//      main kernel does not redo that sum once per channel.
//   2. saliency_pool_kernel: one block per (b, c) row reduces F[b, c, :] * s[b, :] over the h*w
//      positions (consecutive threads read consecutive positions: coalesced; s[b, :] is reread by
//      the C rows of an image from L2) and divides by the image's total.
// The block size follows h*w (one warp for 7x7 grids, up to 256 threads for large ones).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "cuda/block_reduce.cuh"

namespace i2x {
namespace {

using cuda::block_allsum;
using cuda::kMaxGrid;
using cuda::warp_allsum;

constexpr int kMaxThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
saliency_total_kernel(const scalar_t* __restrict__ saliency,
                      at::opmath_type<scalar_t>* __restrict__ totals, int64_t batch,
                      int64_t hw) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t smem[32];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* s = saliency + b * hw;
    opmath_t acc = 0;
    for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) acc += static_cast<opmath_t>(s[p]);
    acc = block_allsum(acc, smem);
    if (threadIdx.x == 0) totals[b] = acc;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
saliency_pool_kernel(const scalar_t* __restrict__ features,
                     const scalar_t* __restrict__ saliency,
                     const at::opmath_type<scalar_t>* __restrict__ totals,
                     scalar_t* __restrict__ out, int64_t channels, int64_t rows,
                     int64_t hw) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t smem[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / channels;
    const scalar_t* f = features + row * hw;
    const scalar_t* s = saliency + b * hw;
    opmath_t acc = 0;
    for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
      acc += static_cast<opmath_t>(f[p]) * static_cast<opmath_t>(s[p]);
    }
    acc = block_allsum(acc, smem);
    if (threadIdx.x == 0) {
      const opmath_t total = totals[b];
      out[row] = static_cast<scalar_t>(total != opmath_t(0) ? acc / total : opmath_t(0));
    }
  }
}

at::Tensor saliency_pool_cuda(const at::Tensor& features, const at::Tensor& saliency) {
  check_saliency_pool_inputs(features, saliency);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::ScalarType st = promoted_type({&features, &saliency});
  const at::Tensor f = features.to(st).contiguous();
  const at::Tensor s = saliency.to(st).contiguous();
  const int64_t B = f.size(0), C = f.size(1), hw = f.size(2) * f.size(3);
  at::Tensor out = at::empty({B, C}, f.options());
  if (out.numel() == 0) return out;

  at::Tensor totals = at::empty({B}, f.options().dtype(opmath_type(st)));
  const int threads = static_cast<int>(std::clamp<int64_t>((hw + 31) / 32 * 32, 32, kMaxThreads));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "i2x_saliency_pool_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int total_blocks = static_cast<int>(std::min(B, kMaxGrid));
    const int row_blocks = static_cast<int>(std::min(B * C, kMaxGrid));
    saliency_total_kernel<scalar_t><<<total_blocks, threads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), totals.mutable_data_ptr<opmath_t>(), B, hw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    saliency_pool_kernel<scalar_t><<<row_blocks, threads, 0, stream>>>(
        f.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
        totals.const_data_ptr<opmath_t>(), out.mutable_data_ptr<scalar_t>(), C, B * C, hw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace i2x

TORCH_LIBRARY_IMPL(i2x, CUDA, m) { m.impl("saliency_pool", &i2x::saliency_pool_cuda); }
