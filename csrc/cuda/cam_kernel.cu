// cam on CUDA: GradCAM-family class activation maps [B, h, w] from activations and gradients
// [B, C, h, w], without materialising any [B, C, h, w] temporary.
//
// Two kernels, both deterministic (no atomics):
//   1. cam_weights_kernel (gradcam, gradcam++, xgradcam only): one block per (b, c) row computes
//      that channel's weight w[b, c] with block reductions over the h*w positions.
//   2. cam_map_kernel: one block per (b, tile of 32 positions); the block's threads are laid out
//      (32 positions) x (S channel slices), each thread sums w_c * A_c (or the elementwise term of
//      layercam / hirescam) over its slice of channels, reading 32 consecutive positions per warp
//      (coalesced), then a shared-memory sum over the slices, ReLU and the cast to the output
//      dtype.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
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

constexpr int kTile = 32;                        // positions per map block (one warp wide)
constexpr int kMaxSlices = 32;                   // channel slices per map block (blockDim.y)

// torch.clamp(min=0): keeps NaN (a plain max would drop it).
template <typename T>
__device__ __forceinline__ T clamp_min0(T v) {
  return v < T(0) ? T(0) : v;
}

// Channel weights w[b, c] of gradcam / gradcam++ / xgradcam; rows = B * C, each hw long.
// One block per row because h*w (up to thousands) is the reduced axis and rows are plentiful
// (B * C); gradcam++ and xgradcam need sum_p A before their weighted pass, so those read the row
// twice (the second read hits L1/L2: a row is at most a few tens of KiB).
template <typename scalar_t, CamMethod M>
__global__ void __launch_bounds__(256)
cam_weights_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ grad,
                   at::opmath_type<scalar_t>* __restrict__ weights, int64_t rows,
                   int64_t hw) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t smem[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* a = act + row * hw;
    const scalar_t* g = grad + row * hw;
    opmath_t w;
    if constexpr (M == CamMethod::GradCAM) {
      opmath_t s = 0;
      for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) s += static_cast<opmath_t>(g[p]);
      w = block_allsum(s, smem) / static_cast<opmath_t>(hw);
    } else {
      opmath_t sa = 0;
      for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) sa += static_cast<opmath_t>(a[p]);
      sa = block_allsum(sa, smem);
      opmath_t s = 0;
      if constexpr (M == CamMethod::GradCAMPlusPlus) {
        const opmath_t eps = static_cast<opmath_t>(kGradCamPlusPlusEps);
        for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
          const opmath_t gv = static_cast<opmath_t>(g[p]);
          const opmath_t g2 = gv * gv;
          const opmath_t g3 = g2 * gv;
          opmath_t aij = g2 / (opmath_t(2) * g2 + sa * g3 + eps);
          if (gv == opmath_t(0)) aij = opmath_t(0);  // torch.where(g != 0, aij, 0)
          s += clamp_min0(gv) * aij;
        }
      } else {  // XGradCAM
        const opmath_t denom = sa + static_cast<opmath_t>(kXGradCamEps);
        for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
          s += static_cast<opmath_t>(g[p]) * static_cast<opmath_t>(a[p]) / denom;
        }
      }
      w = block_allsum(s, smem);
    }
    if (threadIdx.x == 0) weights[row] = w;
  }
}

// The map: out[b, p] = relu?(sum_c term(b, c, p)). blockDim = (kTile, slices); block tiles
// = B * tiles_per_image, grid-strided.
template <typename scalar_t, CamMethod M>
__global__ void __launch_bounds__(kTile * kMaxSlices)
cam_map_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ grad,
               const at::opmath_type<scalar_t>* __restrict__ weights,
               scalar_t* __restrict__ out, int64_t batch, int64_t channels,
               int64_t hw, int64_t tiles_per_image, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t part[kMaxSlices][kTile + 1];
  const int slices = blockDim.y;
  const int64_t tiles = batch * tiles_per_image;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b = tile / tiles_per_image;
    const int64_t p = (tile % tiles_per_image) * kTile + threadIdx.x;
    opmath_t acc = 0;
    if (p < hw) {
      const int64_t base = b * channels * hw + p;
      for (int64_t c = threadIdx.y; c < channels; c += slices) {
        const opmath_t av = static_cast<opmath_t>(act[base + c * hw]);
        if constexpr (M == CamMethod::LayerCAM) {
          acc += clamp_min0(static_cast<opmath_t>(grad[base + c * hw])) * av;
        } else if constexpr (M == CamMethod::HiResCAM) {
          acc += static_cast<opmath_t>(grad[base + c * hw]) * av;
        } else {
          acc += weights[b * channels + c] * av;
        }
      }
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && p < hw) {
      opmath_t m = part[0][threadIdx.x];
      for (int s = 1; s < slices; ++s) m += part[s][threadIdx.x];
      if (relu) m = clamp_min0(m);
      out[b * hw + p] = static_cast<scalar_t>(m);
    }
    __syncthreads();  // part is rewritten by the next tile
  }
}

template <typename scalar_t, CamMethod M>
void launch_cam(const at::Tensor& a, const at::Tensor& g, at::Tensor& out, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = a.size(0), C = a.size(1), hw = a.size(2) * a.size(3);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* act = a.const_data_ptr<scalar_t>();
  const scalar_t* grad = g.const_data_ptr<scalar_t>();

  at::Tensor weights;
  const opmath_t* wptr = nullptr;
  if constexpr (M == CamMethod::GradCAM || M == CamMethod::GradCAMPlusPlus ||
                M == CamMethod::XGradCAM) {
    weights = at::empty({B * C}, a.options().dtype(opmath_type(a.scalar_type())));
    if (B * C > 0) {
      const int64_t rows = B * C;
      // One warp for tiny grids (7x7), up to 256 threads for large ones.
      const int threads = static_cast<int>(std::min<int64_t>(256, (hw + 31) / 32 * 32));
      const int blocks = static_cast<int>(std::min(rows, kMaxGrid));
      cam_weights_kernel<scalar_t, M><<<blocks, threads, 0, stream>>>(
          act, grad, weights.mutable_data_ptr<opmath_t>(), rows, hw);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    wptr = weights.const_data_ptr<opmath_t>();
  }

  const int64_t tiles_per_image = (hw + kTile - 1) / kTile;
  const int64_t tiles = B * tiles_per_image;
  // Few tiles (small batch, small grid): more channel slices per block so the channel loop is
  // spread over more threads; otherwise 8 slices (256 threads) keep enough blocks resident.
  int slices = tiles >= 512 ? 8 : kMaxSlices;
  while (slices > 1 && slices / 2 >= C) slices /= 2;  // no idle slices when C is small
  const dim3 block(kTile, slices);
  const int blocks = static_cast<int>(std::min(tiles, kMaxGrid));
  cam_map_kernel<scalar_t, M><<<blocks, block, 0, stream>>>(
      act, grad, wptr, out.mutable_data_ptr<scalar_t>(), B, C, hw, tiles_per_image, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor cam_cuda(const at::Tensor& activations, const at::Tensor& gradients,
                    c10::string_view method, bool relu) {
  check_cam_inputs(activations, gradients);
  const CamMethod m = parse_cam_method(std::string_view(method.data(), method.size()));
  const c10::cuda::CUDAGuard guard(activations.device());

  const at::ScalarType st = promoted_type({&activations, &gradients});
  const at::Tensor a = activations.to(st).contiguous();
  const at::Tensor g = gradients.to(st).contiguous();
  const int64_t B = a.size(0), h = a.size(2), w = a.size(3);
  at::Tensor out = at::empty({B, h, w}, a.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "i2x_cam_cuda", [&] {
    switch (m) {
      case CamMethod::GradCAM: launch_cam<scalar_t, CamMethod::GradCAM>(a, g, out, relu); break;
      case CamMethod::GradCAMPlusPlus:
        launch_cam<scalar_t, CamMethod::GradCAMPlusPlus>(a, g, out, relu);
        break;
      case CamMethod::XGradCAM: launch_cam<scalar_t, CamMethod::XGradCAM>(a, g, out, relu); break;
      case CamMethod::LayerCAM: launch_cam<scalar_t, CamMethod::LayerCAM>(a, g, out, relu); break;
      case CamMethod::HiResCAM: launch_cam<scalar_t, CamMethod::HiResCAM>(a, g, out, relu); break;
    }
  });
  return out;
}

}  // namespace
}  // namespace i2x

TORCH_LIBRARY_IMPL(i2x, CUDA, m) { m.impl("cam", &i2x::cam_cuda); }
