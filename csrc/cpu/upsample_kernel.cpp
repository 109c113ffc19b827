// upsample_normalize on the CPU: one image per task. Bilinear interpolation is separable, so each
// input row is first interpolated along the width once (h rows of W values), then every output
// row is a two-row blend of those. The image is built in an opmath scratch buffer that stays in
// cache (224 x 224 floats = 196 KiB), its min and max taken on the way, and normalised on the
// final write: one write of the output instead of interpolate + amin + amax + sub + div passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/vec.h"

namespace i2x {
namespace {

// PyTorch's bilinear sampling with align_corners=False, computed in opmath like ATen does.
template <typename acc_t>
struct LinearTap {
  int64_t i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
std::vector<LinearTap<acc_t>> linear_taps(int64_t in, int64_t out) {
  std::vector<LinearTap<acc_t>> taps(out);
  const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
  for (int64_t o = 0; o < out; ++o) {
    acc_t src = (static_cast<acc_t>(o) + acc_t(0.5)) * scale - acc_t(0.5);
    if (src < acc_t(0)) src = acc_t(0);
    const int64_t i0 = static_cast<int64_t>(src);
    const int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
    const acc_t l1 = src - static_cast<acc_t>(i0);
    taps[o] = {i0, i1, acc_t(1) - l1, l1};
  }
  return taps;
}

at::Tensor upsample_normalize_cpu(const at::Tensor& cam_in, at::IntArrayRef size, bool normalize) {
  check_upsample_inputs(cam_in, size);
  const int64_t B = cam_in.size(0), h = cam_in.size(1), w = cam_in.size(2);
  const int64_t H = size[0], W = size[1];
  at::Tensor out = at::empty({B, H, W}, cam_in.options());
  if (B == 0) return out;
  const at::Tensor cam = cam_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cam.scalar_type(), "i2x_upsample_normalize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ytaps = linear_taps<acc_t>(h, H);
    const auto xtaps = linear_taps<acc_t>(w, W);
    const scalar_t* in_ptr = cam.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> rows(h * W);  // input rows interpolated along the width
      std::vector<acc_t> image(H * W);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* src = in_ptr + b * h * w;
        scalar_t* dst = out_ptr + b * H * W;
        const int64_t n = H * W;
        if (normalize) {
          // Decided on the input grid: a NaN anywhere makes the image NaN (even one that
          // downsampling would skip), and a constant grid gives zeros (its resized values may
          // ripple by rounding, which min-max would blow up to [0, 1]).
          acc_t in_lo = static_cast<acc_t>(src[0]), in_hi = in_lo;
          bool in_nan = false;
          for (int64_t i = 0; i < h * w; ++i) {
            const acc_t v = static_cast<acc_t>(src[i]);
            in_nan |= v != v;
            in_lo = v < in_lo ? v : in_lo;
            in_hi = v > in_hi ? v : in_hi;
          }
          if (in_nan || !(in_hi > in_lo)) {
            const acc_t fill = in_nan ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
            for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(fill);
            continue;
          }
        }
        for (int64_t y = 0; y < h; ++y) {
          const scalar_t* s = src + y * w;
          acc_t* r = rows.data() + y * W;
          for (int64_t x = 0; x < W; ++x) {
            const auto& t = xtaps[x];
            r[x] = t.l0 * static_cast<acc_t>(s[t.i0]) + t.l1 * static_cast<acc_t>(s[t.i1]);
          }
        }
        acc_t lo = std::numeric_limits<acc_t>::infinity();
        acc_t hi = -std::numeric_limits<acc_t>::infinity();
        for (int64_t y = 0; y < H; ++y) {
          const auto& t = ytaps[y];
          const acc_t* r0 = rows.data() + t.i0 * W;
          const acc_t* r1 = rows.data() + t.i1 * W;
          acc_t* o = image.data() + y * W;
          I2X_SIMD
          for (int64_t x = 0; x < W; ++x) o[x] = t.l0 * r0[x] + t.l1 * r1[x];
          if (normalize) {
            I2X_PRAGMA(omp simd reduction(min : lo) reduction(max : hi))
            for (int64_t x = 0; x < W; ++x) {
              lo = o[x] < lo ? o[x] : lo;
              hi = o[x] > hi ? o[x] : hi;
            }
          }
        }
        if (!normalize) {
          for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(image[i]);
        } else if (!(hi > lo)) {  // constant after resizing: all zeros, never 0/0
          for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc_t(0));
        } else {
          const acc_t range = hi - lo;
          for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>((image[i] - lo) / range);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(i2x, CPU, m) { m.impl("upsample_normalize", &upsample_normalize_cpu); }

}  // namespace i2x
