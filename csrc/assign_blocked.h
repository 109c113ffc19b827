// prototype_assign, device-agnostic part: walks the positions in blocks, projects each block and
// scores it against the centroids with GEMMs (so memory is O(block x K), never O(positions x K)),
// and hands the block to a per-device kernel that picks the nearest centroid.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace i2x {

// Per-device nearest-centroid kernel over one block of n positions. All tensors are contiguous
// and in the op's compute dtype (float32, or float64 for float64 inputs), on the same device:
//   projected [n, D]   the block's positions after the optional PCA projection
//   scores    [n, K]   projected @ centroids^T
//   norms     [K]      |centroid_k|^2
//   centroids [K, D]
// It writes index[i] = argmin_k (norms[k] - 2 scores[i, k]), ties to the lower k, and
// distance[i] = |projected_i - centroids[index[i]]|^2 computed directly (not by the expansion).
// A position with ANY non-finite score (NaN/inf in its features or in any centroid, or an
// overflow) gets index -1 (and distance NaN); the driver turns that into an error.
using AssignBlockKernel = void (*)(const at::Tensor& projected, const at::Tensor& scores,
                                   const at::Tensor& norms, const at::Tensor& centroids,
                                   at::Tensor& index, at::Tensor& distance);

std::tuple<at::Tensor, at::Tensor> prototype_assign_blocked(
    const at::Tensor& features, const at::Tensor& centroids, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& components, AssignBlockKernel kernel);

}  // namespace i2x
