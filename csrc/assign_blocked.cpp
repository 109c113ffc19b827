#include "assign_blocked.h"

#include <ATen/ATen.h>

#include "checks.h"

namespace i2x {

namespace {

// Positions per block: scores for a block are block_rows x K values, so with K = 128 in float32
// a block holds 4 MiB of scores, small enough to stay in cache-friendly sizes on either device.
constexpr int64_t kBlockRows = 8192;

}  // namespace

std::tuple<at::Tensor, at::Tensor> prototype_assign_blocked(
    const at::Tensor& features, const at::Tensor& centroids, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& components, AssignBlockKernel kernel) {
  const AssignGeometry geo = check_assign_inputs(features, centroids, mean, components);
  const bool has_mean = mean.has_value() && mean->defined();
  const bool has_components = components.has_value() && components->defined();

  const at::ScalarType out_type = promoted_type(
      {&features, &centroids, has_mean ? &*mean : nullptr, has_components ? &*components : nullptr});
  const at::ScalarType compute = opmath_type(out_type);
  const auto fopts = features.options().dtype(compute);

  const bool spatial = features.dim() == 4;
  const int64_t batch = features.size(0);
  const int64_t grid = spatial ? features.size(2) * features.size(3) : 1;  // positions per image
  const int64_t rows = batch * grid;

  at::Tensor index = at::empty({rows}, features.options().dtype(at::kLong));
  at::Tensor distance = at::empty({rows}, fopts);
  if (rows > 0) {
    const at::Tensor cent = centroids.to(compute).contiguous();
    const at::Tensor norms = cent.pow(2).sum(1);
    const at::Tensor cent_t = cent.t();
    // (f - mean) @ W == f @ W - mean @ W: the centring folds into one bias row, so the features are
    // never copied just to subtract the mean.
    std::optional<at::Tensor> weight, bias;
    if (has_components) weight = components->to(compute).contiguous();
    if (has_mean) {
      at::Tensor m = mean->to(compute);
      bias = has_components ? at::matmul(m, *weight) : m;
    }

    // A view of the positions as rows [rows, C] where the layout allows it without a copy
    // (2-D input, or channels-last 4-D); otherwise blocks of whole images are gathered.
    at::Tensor row_view;
    if (!spatial) {
      row_view = features;
    } else {
      at::Tensor nhwc = features.permute({0, 2, 3, 1});
      if (nhwc.is_contiguous()) row_view = nhwc.reshape({rows, geo.channels});
    }
    const int64_t images_per_block = std::max<int64_t>(1, kBlockRows / grid);
    const int64_t step = row_view.defined() ? kBlockRows : images_per_block * grid;

    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t n = std::min(step, rows - r0);
      at::Tensor block;
      if (row_view.defined()) {
        block = row_view.narrow(0, r0, n).to(compute);
      } else {
        // Whole images b0..b1: [nb, C, h, w] -> rows [nb * h * w, C] (only this block is copied).
        block = features.narrow(0, r0 / grid, n / grid)
                    .permute({0, 2, 3, 1})
                    .to(compute)
                    .reshape({n, geo.channels});
      }
      at::Tensor projected;
      if (has_components) {
        projected = has_mean ? at::addmm(*bias, block, *weight, /*beta=*/-1, /*alpha=*/1)
                             : at::mm(block, *weight);
      } else {
        projected = has_mean ? block - *bias : block;
      }
      projected = projected.contiguous();
      at::Tensor scores = at::mm(projected, cent_t);
      at::Tensor index_block = index.narrow(0, r0, n);
      at::Tensor distance_block = distance.narrow(0, r0, n);
      kernel(projected, scores, norms, cent, index_block, distance_block);
    }
    TORCH_CHECK(!(index < 0).any().item<bool>(), "prototype_assign: ",
                (index < 0).sum().item<int64_t>(),
                " position(s) have non-finite distances to every centroid: the features (after "
                "projection), mean, components or centroids contain NaN or inf");
  }
  if (spatial) {
    index = index.view({batch, features.size(2), features.size(3)});
    distance = distance.view({batch, features.size(2), features.size(3)});
  }
  return {index, distance.to(out_type)};
}

}  // namespace i2x
