// cam on the CPU: one image per task, each input read once from memory (a channel row of h*w
// values is reused from L1 when a method needs it twice), the map accumulated in opmath precision.
// Two memory layouts run natively: NCHW-contiguous and channels-last; others are made NCHW first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/vec.h"

namespace i2x {
namespace {

struct CamParams {
  CamMethod method;
  int64_t channels;
  int64_t positions;
};

// gradcam++'s per-position weight relu(g) * g^2 / (2 g^2 + sum_a g^3 + eps), 0 where g == 0.
template <typename acc_t>
inline acc_t gradcam_pp_term(acc_t g, acc_t sum_a) {
  if (g == acc_t(0)) return acc_t(0);
  const acc_t g2 = g * g;
  const acc_t aij = g2 / (acc_t(2) * g2 + sum_a * g2 * g + acc_t(kGradCamPlusPlusEps));
  return (g > acc_t(0) ? g : acc_t(0)) * aij;
}

// One image, NCHW: act/grad point at [C, P]; map is [P] in acc_t, zeroed by the caller.
template <typename scalar_t, typename acc_t>
void cam_image_nchw(const scalar_t* act, const scalar_t* grad, acc_t* map, const CamParams& p) {
  const int64_t P = p.positions;
  for (int64_t c = 0; c < p.channels; ++c) {
    const scalar_t* a = act + c * P;
    const scalar_t* g = grad + c * P;
    switch (p.method) {
      case CamMethod::LayerCAM:
        I2X_SIMD
        for (int64_t i = 0; i < P; ++i) {
          const acc_t gi = static_cast<acc_t>(g[i]);
          map[i] += (gi > acc_t(0) ? gi : acc_t(0)) * static_cast<acc_t>(a[i]);
        }
        continue;
      case CamMethod::HiResCAM:
        I2X_SIMD
        for (int64_t i = 0; i < P; ++i) map[i] += static_cast<acc_t>(g[i]) * static_cast<acc_t>(a[i]);
        continue;
      default:
        break;
    }
    acc_t w = 0;
    if (p.method == CamMethod::GradCAM) {
      acc_t s = 0;
      I2X_SIMD_SUM(s)
      for (int64_t i = 0; i < P; ++i) s += static_cast<acc_t>(g[i]);
      w = s / static_cast<acc_t>(P);
    } else {
      acc_t sum_a = 0;
      I2X_SIMD_SUM(sum_a)
      for (int64_t i = 0; i < P; ++i) sum_a += static_cast<acc_t>(a[i]);
      acc_t s = 0;
      if (p.method == CamMethod::XGradCAM) {
        I2X_SIMD_SUM(s)
        for (int64_t i = 0; i < P; ++i) s += static_cast<acc_t>(g[i]) * static_cast<acc_t>(a[i]);
        w = s / (sum_a + acc_t(kXGradCamEps));
      } else {  // GradCAM++
        for (int64_t i = 0; i < P; ++i) s += gradcam_pp_term<acc_t>(static_cast<acc_t>(g[i]), sum_a);
        w = s;
      }
    }
    I2X_SIMD
    for (int64_t i = 0; i < P; ++i) map[i] += w * static_cast<acc_t>(a[i]);
  }
}

// One image, channels-last: act/grad point at [P, C]; `weights` and `sums` are C-long scratch.
template <typename scalar_t, typename acc_t>
void cam_image_nhwc(const scalar_t* act, const scalar_t* grad, acc_t* map, acc_t* weights, acc_t* sums,
                    const CamParams& p) {
  const int64_t P = p.positions, C = p.channels;
  if (p.method == CamMethod::LayerCAM || p.method == CamMethod::HiResCAM) {
    const bool layer = p.method == CamMethod::LayerCAM;
    for (int64_t i = 0; i < P; ++i) {
      const scalar_t* a = act + i * C;
      const scalar_t* g = grad + i * C;
      acc_t s = 0;
      if (layer) {
        I2X_SIMD_SUM(s)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gc = static_cast<acc_t>(g[c]);
          s += (gc > acc_t(0) ? gc : acc_t(0)) * static_cast<acc_t>(a[c]);
        }
      } else {
        I2X_SIMD_SUM(s)
        for (int64_t c = 0; c < C; ++c) s += static_cast<acc_t>(g[c]) * static_cast<acc_t>(a[c]);
      }
      map[i] = s;
    }
    return;
  }
  std::fill(weights, weights + C, acc_t(0));
  if (p.method == CamMethod::GradCAM) {
    for (int64_t i = 0; i < P; ++i) {
      const scalar_t* g = grad + i * C;
      I2X_SIMD
      for (int64_t c = 0; c < C; ++c) weights[c] += static_cast<acc_t>(g[c]);
    }
    for (int64_t c = 0; c < C; ++c) weights[c] /= static_cast<acc_t>(P);
  } else {
    std::fill(sums, sums + C, acc_t(0));
    for (int64_t i = 0; i < P; ++i) {
      const scalar_t* a = act + i * C;
      I2X_SIMD
      for (int64_t c = 0; c < C; ++c) sums[c] += static_cast<acc_t>(a[c]);
    }
    for (int64_t i = 0; i < P; ++i) {
      const scalar_t* a = act + i * C;
      const scalar_t* g = grad + i * C;
      if (p.method == CamMethod::XGradCAM) {
        I2X_SIMD
        for (int64_t c = 0; c < C; ++c) weights[c] += static_cast<acc_t>(g[c]) * static_cast<acc_t>(a[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) weights[c] += gradcam_pp_term<acc_t>(static_cast<acc_t>(g[c]), sums[c]);
      }
    }
    if (p.method == CamMethod::XGradCAM) {
      for (int64_t c = 0; c < C; ++c) weights[c] /= (sums[c] + acc_t(kXGradCamEps));
    }
  }
  for (int64_t i = 0; i < P; ++i) {
    const scalar_t* a = act + i * C;
    acc_t s = 0;
    I2X_SIMD_SUM(s)
    for (int64_t c = 0; c < C; ++c) s += weights[c] * static_cast<acc_t>(a[c]);
    map[i] = s;
  }
}

at::Tensor cam_cpu(const at::Tensor& activations_in, const at::Tensor& gradients_in, c10::string_view method,
                   bool relu) {
  check_cam_inputs(activations_in, gradients_in);
  const CamMethod m = parse_cam_method(method);
  const at::ScalarType dtype = promoted_type({&activations_in, &gradients_in});
  const int64_t B = activations_in.size(0), C = activations_in.size(1);
  const int64_t H = activations_in.size(2), W = activations_in.size(3), P = H * W;
  at::Tensor out = at::empty({B, H, W}, activations_in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  if (C == 0) return out.zero_();

  // Channels-last when the activations already are (gradients from autograd follow them);
  // everything else is read as NCHW-contiguous.
  const bool nhwc = !activations_in.is_contiguous() &&
                    activations_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor act = activations_in.to(dtype).contiguous(fmt);
  const at::Tensor grad = gradients_in.to(dtype).contiguous(fmt);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "i2x_cam_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CamParams params{m, C, P};
    const scalar_t* act_ptr = act.const_data_ptr<scalar_t>();
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    // Grain of one image: images are independent and each is C*h*w work.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> map(P), weights(nhwc ? C : 0), sums(nhwc ? C : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* a = act_ptr + b * C * P;
        const scalar_t* g = grad_ptr + b * C * P;
        if (nhwc) {
          cam_image_nhwc<scalar_t, acc_t>(a, g, map.data(), weights.data(), sums.data(), params);
        } else {
          std::fill(map.begin(), map.end(), acc_t(0));
          cam_image_nchw<scalar_t, acc_t>(a, g, map.data(), params);
        }
        scalar_t* o = out_ptr + b * P;
        for (int64_t i = 0; i < P; ++i) {
          const acc_t v = map[i];
          o[i] = static_cast<scalar_t>(relu && !(v > acc_t(0)) && v == v ? acc_t(0) : v);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(i2x, CPU, m) { m.impl("cam", &cam_cpu); }

}  // namespace i2x
