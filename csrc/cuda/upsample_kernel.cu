// upsample_normalize on CUDA: bilinear resize [B, h, w] -> [B, H, W] sampling exactly like
// F.interpolate(mode="bilinear", align_corners=False) on CUDA, then an optional per-image min-max.
//
// Each image is split into T "stripes" (block b*T + t handles positions t*256 + tid, stepping by
// T*256), with T chosen so that B*T blocks fill the GPU even for B = 1 while each block keeps
// >= ~1k positions of work. Two kernels, no [B, H, W] scratch:
//   1. upsample_minmax_kernel (normalize only): each block interpolates its stripe and writes its
//      (min, max) partial to a tiny [B*T] buffer; NaN propagates through both.
//   2. upsample_write_kernel: each block reduces its image's T partials (T <= ~1k, cheap and
//      L2-resident), re-interpolates its stripe (cheaper than reading a stored copy back) and
//      writes (v - lo) / (hi - lo), 0 for a flat image, NaN for an image holding a NaN; or the
//      plain interpolated values without normalize.
// Both are deterministic (no atomics).
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
#include <limits>

#include "checks.h"
#include "cuda/block_reduce.cuh"

namespace i2x {
namespace {

using cuda::block_allsum;
using cuda::kMaxGrid;
using cuda::warp_allsum;

constexpr int kThreads = 256;

// min / max that propagate NaN like torch.amin / torch.amax.
template <typename T>
__device__ __forceinline__ T nan_min(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (b < a ? b : a));
}
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (b > a ? b : a));
}

// (lo, hi) over the block, returned to every thread. blockDim.x == kThreads; every thread calls it.
template <typename T>
__device__ __forceinline__ void block_allminmax(T& lo, T& hi, T* smem_lo, T* smem_hi) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    lo = nan_min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = nan_max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) {
    smem_lo[warp] = lo;
    smem_hi[warp] = hi;
  }
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  lo = lane < kWarps ? smem_lo[lane] : smem_lo[0];
  hi = lane < kWarps ? smem_hi[lane] : smem_hi[0];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    lo = nan_min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = nan_max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
}

// Explicitly rounded arithmetic: the compiler may not contract these into other FMAs, so the
// interpolation rounds identically in both kernels (the write kernel recomputes exactly the values
// the min-max kernel saw: the image max maps to exactly 1, the min to exactly 0).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// PyTorch's area_pixel_compute_source_index for align_corners=False, linear mode, with the
// product and the difference rounded separately (not fused): that keeps the lambdas short enough
// for l0 = 1 - l1 to be exact, which with the fma form below reproduces a constant map exactly
// (checked in float32 emulation for 1x1 and 3x5 maps resized to many sizes).
template <typename T>
__device__ __forceinline__ T source_index(T scale, int64_t dst) {
  const T half = static_cast<T>(0.5);
  const T src = sub_rn(mul_rn(scale, static_cast<T>(dst) + half), half);
  return src < T(0) ? T(0) : src;
}

template <typename scalar_t>
struct Bilinear {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* in;  // [B, h, w]
  int64_t h, w, H, W;
  opmath_t rh, rw;     // in / out
  bool copy;           // same size: PyTorch's CUDA kernel copies (no 0 * neighbour terms)

  __device__ __forceinline__ opmath_t operator()(int64_t b, int64_t p) const {
    const int64_t y = p / W;
    const int64_t x = p - y * W;
    const scalar_t* img = in + b * h * w;
    if (copy) return static_cast<opmath_t>(img[y * w + x]);
    const opmath_t sy = source_index(rh, y);
    const int64_t y0 = static_cast<int64_t>(sy);
    const int64_t y1 = y0 + (y0 < h - 1 ? 1 : 0);
    const opmath_t ly1 = sy - static_cast<opmath_t>(y0);
    const opmath_t ly0 = opmath_t(1) - ly1;
    const opmath_t sx = source_index(rw, x);
    const int64_t x0 = static_cast<int64_t>(sx);
    const int64_t x1 = x0 + (x0 < w - 1 ? 1 : 0);
    const opmath_t lx1 = sx - static_cast<opmath_t>(x0);
    const opmath_t lx0 = opmath_t(1) - lx1;
    const opmath_t v00 = static_cast<opmath_t>(img[y0 * w + x0]);
    const opmath_t v01 = static_cast<opmath_t>(img[y0 * w + x1]);
    const opmath_t v10 = static_cast<opmath_t>(img[y1 * w + x0]);
    const opmath_t v11 = static_cast<opmath_t>(img[y1 * w + x1]);
    // l0 * a + l1 * b as fma(l1, b, l0 * a): one rounding fewer than two products and a sum.
    const opmath_t top = fma_rn(lx1, v01, mul_rn(lx0, v00));
    const opmath_t bot = fma_rn(lx1, v11, mul_rn(lx0, v10));
    return fma_rn(ly1, bot, mul_rn(ly0, top));
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
upsample_minmax_kernel(Bilinear<scalar_t> f, int64_t batch, int64_t stripes,
                       at::opmath_type<scalar_t>* __restrict__ part_lo,
                       at::opmath_type<scalar_t>* __restrict__ part_hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t smem_lo[32], smem_hi[32];
  const int64_t HW = f.H * f.W;
  for (int64_t blk = blockIdx.x; blk < batch * stripes; blk += gridDim.x) {
    const int64_t b = blk / stripes;
    const int64_t t = blk - b * stripes;
    opmath_t lo = std::numeric_limits<opmath_t>::infinity();
    opmath_t hi = -std::numeric_limits<opmath_t>::infinity();
    for (int64_t p = t * kThreads + threadIdx.x; p < HW; p += stripes * kThreads) {
      const opmath_t v = f(b, p);
      lo = nan_min(lo, v);
      hi = nan_max(hi, v);
    }
    block_allminmax(lo, hi, smem_lo, smem_hi);
    if (threadIdx.x == 0) {
      part_lo[blk] = lo;
      part_hi[blk] = hi;
    }
    if (t == 0) {
      // The input grid's own min / max (NaN-propagating), stored after the stripe partials: a NaN
      // anywhere in the grid makes the image NaN and a constant grid gives zeros, decided on the
      // input as the CPU kernel does (resized values of a constant grid may ripple by rounding).
      opmath_t in_lo = std::numeric_limits<opmath_t>::infinity();
      opmath_t in_hi = -std::numeric_limits<opmath_t>::infinity();
      const scalar_t* img = f.in + b * f.h * f.w;
      for (int64_t p = threadIdx.x; p < f.h * f.w; p += kThreads) {
        const opmath_t v = static_cast<opmath_t>(img[p]);
        in_lo = nan_min(in_lo, v);
        in_hi = nan_max(in_hi, v);
      }
      block_allminmax(in_lo, in_hi, smem_lo, smem_hi);
      if (threadIdx.x == 0) {
        part_lo[batch * stripes + b] = in_lo;
        part_hi[batch * stripes + b] = in_hi;
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
upsample_write_kernel(Bilinear<scalar_t> f, int64_t batch, int64_t stripes, bool normalize,
                      const at::opmath_type<scalar_t>* __restrict__ part_lo,
                      const at::opmath_type<scalar_t>* __restrict__ part_hi,
                      scalar_t* __restrict__ out) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t smem_lo[32], smem_hi[32];
  const int64_t HW = f.H * f.W;
  for (int64_t blk = blockIdx.x; blk < batch * stripes; blk += gridDim.x) {
    const int64_t b = blk / stripes;
    const int64_t t = blk - b * stripes;
    opmath_t lo = 0, scale = 1;
    bool flat = false, has_nan = false;
    if (normalize) {
      lo = std::numeric_limits<opmath_t>::infinity();
      opmath_t hi = -std::numeric_limits<opmath_t>::infinity();
      for (int64_t i = threadIdx.x; i < stripes; i += kThreads) {
        lo = nan_min(lo, part_lo[b * stripes + i]);
        hi = nan_max(hi, part_hi[b * stripes + i]);
      }
      block_allminmax(lo, hi, smem_lo, smem_hi);
      const opmath_t in_lo = part_lo[batch * stripes + b], in_hi = part_hi[batch * stripes + b];
      has_nan = (lo != lo) || (hi != hi) || (in_lo != in_lo) || (in_hi != in_hi);
      const opmath_t range = hi - lo;
      flat = !(range > opmath_t(0)) || !(in_hi > in_lo);  // constant (or inf - inf): all zeros
      scale = range;
    }
    scalar_t* img = out + b * HW;
    for (int64_t p = t * kThreads + threadIdx.x; p < HW; p += stripes * kThreads) {
      opmath_t v;
      if (!normalize) {
        v = f(b, p);
      } else if (has_nan) {
        v = std::numeric_limits<opmath_t>::quiet_NaN();
      } else if (flat) {
        v = 0;
      } else {
        v = (f(b, p) - lo) / scale;
      }
      img[p] = static_cast<scalar_t>(v);
    }
  }
}

at::Tensor upsample_normalize_cuda(const at::Tensor& cam, at::IntArrayRef size, bool normalize) {
  check_upsample_inputs(cam, size);
  const c10::cuda::CUDAGuard guard(cam.device());
  const at::Tensor x = cam.contiguous();
  const int64_t B = x.size(0), h = x.size(1), w = x.size(2);
  const int64_t H = size[0], W = size[1];
  at::Tensor out = at::empty({B, H, W}, x.options());
  if (out.numel() == 0) return out;

  const int64_t HW = H * W;
  // Stripes per image: about one per 1k output positions, but no more than needed for the
  // whole batch to reach ~2k blocks (and at least one).
  const int64_t stripes =
      std::max<int64_t>(1, std::min<int64_t>((HW + 1023) / 1024, (2048 + B - 1) / B));
  const int blocks = static_cast<int>(std::min(B * stripes, kMaxGrid));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::ScalarType st = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "i2x_upsample_normalize_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Bilinear<scalar_t> f{x.const_data_ptr<scalar_t>(),
                         h,
                         w,
                         H,
                         W,
                         static_cast<opmath_t>(h) / static_cast<opmath_t>(H),
                         static_cast<opmath_t>(w) / static_cast<opmath_t>(W),
                         h == H && w == W};
    at::Tensor partials;
    const opmath_t* lo_ptr = nullptr;
    const opmath_t* hi_ptr = nullptr;
    if (normalize) {
      // Per row: B * stripes stripe partials, then B input-grid extremes.
      partials = at::empty({2, B * stripes + B}, x.options().dtype(opmath_type(x.scalar_type())));
      opmath_t* lo = partials.mutable_data_ptr<opmath_t>();
      opmath_t* hi = lo + B * stripes + B;
      upsample_minmax_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(f, B, stripes, lo, hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      lo_ptr = lo;
      hi_ptr = hi;
    }
    upsample_write_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        f, B, stripes, normalize, lo_ptr, hi_ptr, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace i2x

TORCH_LIBRARY_IMPL(i2x, CUDA, m) { m.impl("upsample_normalize", &i2x::upsample_normalize_cuda); }
