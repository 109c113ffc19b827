// saliency_pool on the CPU: a saliency-weighted mean over the h*w positions of every channel.
// Memory-bound (each feature is read once), so the work is one streaming pass: NCHW reads each
// channel row as a dot product with the image's saliency; channels-last accumulates whole
// C-vectors scaled by each position's saliency.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/vec.h"

namespace i2x {
namespace {

at::Tensor saliency_pool_cpu(const at::Tensor& features_in, const at::Tensor& saliency_in) {
  check_saliency_pool_inputs(features_in, saliency_in);
  const at::ScalarType dtype = promoted_type({&features_in, &saliency_in});
  const int64_t B = features_in.size(0), C = features_in.size(1);
  const int64_t P = features_in.size(2) * features_in.size(3);
  at::Tensor out = at::empty({B, C}, features_in.options().dtype(dtype));
  if (out.numel() == 0) return out;

  const bool nhwc = !features_in.is_contiguous() &&
                    features_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor features =
      features_in.to(dtype).contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor saliency = saliency_in.to(dtype).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "i2x_saliency_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    const scalar_t* s = saliency.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();

    // 1 / sum of each image's saliency (0 where the sum is 0, which makes that row all zeros).
    std::vector<acc_t> inv_total(B);
    std::vector<acc_t> sal(B * P);
    for (int64_t b = 0; b < B; ++b) {
      acc_t total = 0;
      for (int64_t i = 0; i < P; ++i) {
        sal[b * P + i] = static_cast<acc_t>(s[b * P + i]);
        total += sal[b * P + i];
      }
      inv_total[b] = total != acc_t(0) ? acc_t(1) / total : acc_t(0);
    }

    if (!nhwc) {
      // Rows (b, c) are independent dot products of length P.
      at::parallel_for(0, B * C, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / C;
          const scalar_t* fr = f + r * P;
          const acc_t* sb = sal.data() + b * P;
          acc_t acc = 0;
          I2X_SIMD_SUM(acc)
          for (int64_t i = 0; i < P; ++i) acc += static_cast<acc_t>(fr[i]) * sb[i];
          o[r] = static_cast<scalar_t>(acc * inv_total[b]);
        }
      });
    } else {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> acc(C);
        for (int64_t b = b0; b < b1; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          const acc_t* sb = sal.data() + b * P;
          for (int64_t i = 0; i < P; ++i) {
            const scalar_t* fr = f + (b * P + i) * C;
            const acc_t w = sb[i];
            I2X_SIMD
            for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(fr[c]);
          }
          for (int64_t c = 0; c < C; ++c) o[b * C + c] = static_cast<scalar_t>(acc[c] * inv_total[b]);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(i2x, CPU, m) { m.impl("saliency_pool", &saliency_pool_cpu); }

}  // namespace i2x
