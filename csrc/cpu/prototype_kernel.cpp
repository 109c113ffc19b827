// Prototype kernels on the CPU: the nearest-centroid step of prototype_assign (the blocking and
// GEMMs live in assign_blocked.cpp) and prototype_pool.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "assign_blocked.h"
#include "checks.h"
#include "cpu/vec.h"

namespace i2x {
namespace {

// Nearest centroid per row of one block; see AssignBlockKernel for the contract.
void assign_block_cpu(const at::Tensor& projected, const at::Tensor& scores, const at::Tensor& norms,
                      const at::Tensor& centroids, at::Tensor& index, at::Tensor& distance) {
  const int64_t n = scores.size(0), K = scores.size(1), D = projected.size(1);
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "i2x_assign_block_cpu", [&] {
    const scalar_t* p = projected.const_data_ptr<scalar_t>();
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const scalar_t* nrm = norms.const_data_ptr<scalar_t>();
    const scalar_t* cen = centroids.const_data_ptr<scalar_t>();
    int64_t* idx = index.mutable_data_ptr<int64_t>();
    scalar_t* dist = distance.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = s + i * K;
        // |x - c_k|^2 = |x|^2 + |c_k|^2 - 2 x.c_k; |x|^2 is the same for every k. Strict `<` keeps
        // the lowest k among ties. Any non-finite score (NaN or inf in the position's features or in
        // any centroid, or an overflow) marks the row -1, which the caller reports as an error.
        scalar_t best = std::numeric_limits<scalar_t>::infinity();
        int64_t best_k = -1;
        bool finite = true;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t v = nrm[k] - scalar_t(2) * row[k];
          finite &= std::abs(v) <= std::numeric_limits<scalar_t>::max();
          if (v < best) {
            best = v;
            best_k = k;
          }
        }
        if (!finite) best_k = -1;
        idx[i] = best_k;
        if (best_k < 0) {
          dist[i] = std::numeric_limits<scalar_t>::quiet_NaN();
          continue;
        }
        // The reported distance is computed directly, free of the expansion's cancellation.
        const scalar_t* x = p + i * D;
        const scalar_t* c = cen + best_k * D;
        scalar_t d2 = 0;
        I2X_SIMD_SUM(d2)
        for (int64_t d = 0; d < D; ++d) d2 += (x[d] - c[d]) * (x[d] - c[d]);
        dist[i] = d2;
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> prototype_assign_cpu(const at::Tensor& features, const at::Tensor& centroids,
                                                        const std::optional<at::Tensor>& mean,
                                                        const std::optional<at::Tensor>& components) {
  return prototype_assign_blocked(features, centroids, mean, components, &assign_block_cpu);
}

// Work per task, in positions + prototypes touched: waking a sleeping OpenMP thread costs ~30 us
// here (OMP_WAIT_POLICY=PASSIVE), the time for ~64k such cheap steps, so smaller jobs (B=256 at
// 7x7 with K=128 is 45k) run on one thread.
constexpr int64_t kPoolWorkPerTask = int64_t{1} << 16;

template <typename scalar_t, typename index_t>
void prototype_pool_kernel(const at::Tensor& saliency, const at::Tensor& assignment, int64_t K,
                           at::Tensor& intensity, at::Tensor& counts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = saliency.size(0), P = saliency.size(1) * saliency.size(2);
  const scalar_t* s = saliency.const_data_ptr<scalar_t>();
  const index_t* a = assignment.const_data_ptr<index_t>();
  scalar_t* out = intensity.mutable_data_ptr<scalar_t>();
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kPoolWorkPerTask / (P + K));
  // Captured by value: the counts are int64 stores, which the compiler must assume could alias
  // K and P if they were read through references, reloading them on every iteration.
  at::parallel_for(0, B, grain, [=](int64_t b0, int64_t b1) {
    // Only the prototypes present in an image (at most h*w of K) are touched after the output
    // rows are zeroed: the scratch sums/counts are reset entry by entry as they are consumed.
    std::vector<acc_t> sums(K, acc_t(0));
    std::vector<int64_t> num(K, 0);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* sb = s + b * P;
      const index_t* ab = a + b * P;
      scalar_t* o = out + b * K;
      int64_t* c = cnt + b * K;
      std::fill(o, o + K, scalar_t(0));
      std::fill(c, c + K, int64_t(0));
      bool out_of_range = false;
      for (int64_t i = 0; i < P; ++i) {
        const int64_t k = static_cast<int64_t>(ab[i]);
        if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(K)) {
          out_of_range = true;
          continue;
        }
        sums[k] += static_cast<acc_t>(sb[i]);
        num[k] += 1;
      }
      if (C10_UNLIKELY(out_of_range)) {
        for (int64_t i = 0; i < P; ++i) {
          const int64_t k = static_cast<int64_t>(ab[i]);
          TORCH_CHECK(k >= 0 && k < K, "prototype_pool: assignment values must lie in [0, num_prototypes) = [0, ",
                      K, "), got ", k, " at image ", b, ", position ", i);
        }
      }
      for (int64_t i = 0; i < P; ++i) {
        const int64_t k = static_cast<int64_t>(ab[i]);
        if (num[k] > 0) {
          o[k] = static_cast<scalar_t>(sums[k] / static_cast<acc_t>(num[k]));
          c[k] = num[k];
          sums[k] = acc_t(0);
          num[k] = 0;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prototype_pool_cpu(const at::Tensor& saliency_in, const at::Tensor& assignment_in,
                                                      int64_t num_prototypes) {
  check_pool_inputs(saliency_in, assignment_in, num_prototypes);
  const int64_t B = saliency_in.size(0);
  at::Tensor intensity = at::empty({B, num_prototypes}, saliency_in.options());
  at::Tensor counts = at::empty({B, num_prototypes}, saliency_in.options().dtype(at::kLong));
  if (B == 0) return {intensity, counts};
  const at::Tensor saliency = saliency_in.contiguous();
  const at::Tensor assignment = assignment_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saliency.scalar_type(), "i2x_prototype_pool_cpu", [&] {
    if (assignment.scalar_type() == at::kLong) {
      prototype_pool_kernel<scalar_t, int64_t>(saliency, assignment, num_prototypes, intensity, counts);
    } else {
      prototype_pool_kernel<scalar_t, int32_t>(saliency, assignment, num_prototypes, intensity, counts);
    }
  });
  return {intensity, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(i2x, CPU, m) {
  m.impl("prototype_assign", &prototype_assign_cpu);
  m.impl("prototype_pool", &prototype_pool_cpu);
}

}  // namespace i2x
