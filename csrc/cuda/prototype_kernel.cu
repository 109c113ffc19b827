// prototype_assign (the per-block nearest-centroid kernel for the device-agnostic blocked driver)
// and prototype_pool on CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "assign_blocked.h"
#include "checks.h"
#include "cuda/block_reduce.cuh"

namespace i2x {
namespace {

using cuda::block_allsum;
using cuda::kMaxGrid;
using cuda::warp_allsum;


// ---------------------------------------------------------------------------------------------
// prototype_assign block kernel: one warp per position (row i). The lanes stride over the K
// scores of the row (coalesced reads of scores[i, :]), each keeping its best
// norms[k] - 2 scores[i, k] (strict '<' while k increases keeps the lowest k on ties); a warp
// butterfly then combines the lanes with ties broken toward the lower k, so every lane ends with
// the same winner. The lanes then stride over D to compute |p_i - c_idx|^2 exactly.
constexpr int kAssignWarps = 8;  // warps (positions) per block

template <typename T>
__global__ void __launch_bounds__(kAssignWarps * 32)
assign_block_kernel(const T* __restrict__ projected, const T* __restrict__ scores,
                    const T* __restrict__ norms, const T* __restrict__ centroids,
                    int64_t* __restrict__ index, T* __restrict__ distance, int64_t n, int64_t K,
                    int64_t D) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kAssignWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kAssignWarps + (threadIdx.x >> 5); i < n;
       i += warps) {
    const T* s = scores + i * K;
    T best = 0;
    long long best_k = -1;
    bool finite = true;
    for (int64_t k = lane; k < K; k += 32) {
      const T v = norms[k] - T(2) * s[k];
      finite = finite && isfinite(v);
      if (best_k < 0 || v < best) {
        best = v;
        best_k = k;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const T ov = __shfl_xor_sync(0xffffffffu, best, off);
      const long long ok = __shfl_xor_sync(0xffffffffu, best_k, off);
      if (ok >= 0 && (best_k < 0 || ov < best || (ov == best && ok < best_k))) {
        best = ov;
        best_k = ok;
      }
    }
    // Any non-finite score in the row (NaN/inf in this position's features or in any centroid, or
    // an overflow) makes the row -1: the driver reports it as an error, as on the CPU.
    if (!__all_sync(0xffffffffu, finite)) best_k = -1;
    T d = 0;
    if (best_k >= 0) {
      const T* p = projected + i * D;
      const T* c = centroids + best_k * D;
      for (int64_t j = lane; j < D; j += 32) {
        const T diff = p[j] - c[j];
        d += diff * diff;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
    }
    if (lane == 0) {
      index[i] = best_k;
      distance[i] = best_k >= 0 ? d : std::numeric_limits<T>::quiet_NaN();
    }
  }
}

void assign_block_cuda(const at::Tensor& projected, const at::Tensor& scores,
                       const at::Tensor& norms, const at::Tensor& centroids, at::Tensor& index,
                       at::Tensor& distance) {
  const c10::cuda::CUDAGuard guard(projected.device());
  TORCH_CHECK(projected.is_contiguous() && scores.is_contiguous() && norms.is_contiguous() &&
                  centroids.is_contiguous() && index.is_contiguous() && distance.is_contiguous(),
              "prototype_assign: internal error, the block kernel expects contiguous tensors");
  TORCH_CHECK(index.scalar_type() == at::kLong,
              "prototype_assign: internal error, index must be int64");
  const int64_t n = scores.size(0), K = scores.size(1), D = projected.size(1);
  if (n == 0) return;
  const int blocks = static_cast<int>(std::min((n + kAssignWarps - 1) / kAssignWarps, kMaxGrid));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "i2x_prototype_assign_cuda", [&] {
    assign_block_kernel<scalar_t><<<blocks, kAssignWarps * 32, 0, stream>>>(
        projected.const_data_ptr<scalar_t>(), scores.const_data_ptr<scalar_t>(),
        norms.const_data_ptr<scalar_t>(), centroids.const_data_ptr<scalar_t>(),
        index.mutable_data_ptr<int64_t>(), distance.mutable_data_ptr<scalar_t>(), n, K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> prototype_assign_cuda(
    const at::Tensor& features, const at::Tensor& centroids, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& components) {
  const c10::cuda::CUDAGuard guard(features.device());
  return prototype_assign_blocked(features, centroids, mean, components, &assign_block_cuda);
}

// ---------------------------------------------------------------------------------------------
// prototype_pool: one block per image builds a shared-memory histogram (sum of saliency, count)
// over its h*w positions with shared atomics, then writes intensity = sum / max(count, 1) and the
// counts straight to the outputs: no global atomics, no scratch, no epilogue kernel. K larger
// than the shared-memory budget is handled in chunks of prototypes (each chunk rereads the
// image's assignment; only for unusually large K). Indices were range-checked on the host.
constexpr int kPoolThreads = 256;
constexpr int64_t kPoolSmemBytes = 32 * 1024;

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kPoolThreads, 4)  // (min 4 blocks/SM: without it ptxas spills)
prototype_pool_kernel(const scalar_t* __restrict__ saliency, const index_t* __restrict__ assignment,
                      scalar_t* __restrict__ intensity, int64_t* __restrict__ counts, int64_t batch,
                      int64_t hw, int64_t K, int64_t chunk) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char pool_smem[];
  opmath_t* sums = reinterpret_cast<opmath_t*>(pool_smem);
  unsigned int* cnt = reinterpret_cast<unsigned int*>(sums + chunk);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* s = saliency + b * hw;
    const index_t* a = assignment + b * hw;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t kn = std::min(chunk, K - k0);
      for (int64_t i = threadIdx.x; i < kn; i += kPoolThreads) {
        sums[i] = 0;
        cnt[i] = 0;
      }
      __syncthreads();
      for (int64_t p = threadIdx.x; p < hw; p += kPoolThreads) {
        const int64_t k = static_cast<int64_t>(a[p]) - k0;
        if (k >= 0 && k < kn) {
          atomicAdd(&sums[k], static_cast<opmath_t>(s[p]));
          atomicAdd(&cnt[k], 1u);
        }
      }
      __syncthreads();
      for (int64_t i = threadIdx.x; i < kn; i += kPoolThreads) {
        const unsigned int c = cnt[i];
        counts[b * K + k0 + i] = static_cast<int64_t>(c);
        intensity[b * K + k0 + i] =
            static_cast<scalar_t>(sums[i] / static_cast<opmath_t>(c > 0u ? c : 1u));
      }
      __syncthreads();  // the histogram is reset for the next chunk / image
    }
  }
}

std::tuple<at::Tensor, at::Tensor> prototype_pool_cuda(const at::Tensor& saliency,
                                                       const at::Tensor& assignment,
                                                       int64_t num_prototypes) {
  check_pool_inputs(saliency, assignment, num_prototypes);
  const c10::cuda::CUDAGuard guard(saliency.device());
  const int64_t K = num_prototypes;
  const at::Tensor s = saliency.contiguous();
  const at::Tensor a = assignment.contiguous();
  const int64_t B = s.size(0), hw = s.size(1) * s.size(2);
  at::Tensor intensity = at::empty({B, K}, s.options());
  at::Tensor counts = at::empty({B, K}, s.options().dtype(at::kLong));
  if (B == 0) return {intensity, counts};
  TORCH_CHECK(hw < (int64_t{1} << 32),
              "prototype_pool: at most 2^32 - 1 positions per image, got ", hw);

  if (hw > 0) {
    // One reduction and one device-to-host copy (a single sync) for both bounds.
    const auto [lo_t, hi_t] = at::aminmax(a);
    const at::Tensor bounds = at::stack({lo_t, hi_t}).to(at::kCPU, at::kLong);
    const int64_t lo = bounds.const_data_ptr<int64_t>()[0];
    const int64_t hi = bounds.const_data_ptr<int64_t>()[1];
    TORCH_CHECK(lo >= 0 && hi < K, "prototype_pool: assignment values must lie in [0, K) = [0, ", K,
                "), got min ", lo, " and max ", hi);
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = static_cast<int>(std::min(B, kMaxGrid));
  const at::ScalarType st = s.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "i2x_prototype_pool_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int64_t per_k = sizeof(opmath_t) + sizeof(unsigned int);
    const int64_t chunk = std::min<int64_t>(K, kPoolSmemBytes / per_k);
    const size_t smem = static_cast<size_t>(chunk * per_k);
    AT_DISPATCH_INDEX_TYPES(a.scalar_type(), "i2x_prototype_pool_cuda_index", [&] {
      prototype_pool_kernel<scalar_t, index_t><<<blocks, kPoolThreads, smem, stream>>>(
          s.const_data_ptr<scalar_t>(), a.const_data_ptr<index_t>(),
          intensity.mutable_data_ptr<scalar_t>(), counts.mutable_data_ptr<int64_t>(), B, hw, K,
          chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {intensity, counts};
}

}  // namespace
}  // namespace i2x

TORCH_LIBRARY_IMPL(i2x, CUDA, m) {
  m.impl("prototype_assign", &i2x::prototype_assign_cuda);
  m.impl("prototype_pool", &i2x::prototype_pool_cuda);
}
