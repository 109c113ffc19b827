// Input validation shared by the CPU and CUDA kernels.
// Every message names the op, the argument, what was expected and what came, so a user can act
// on it without reading this file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <initializer_list>
#include <optional>

#include <c10/core/ScalarType.h>

namespace i2x {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is undefined (None); expected a tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", arg, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_dim(const at::Tensor& t, int64_t ndim, const char* op, const char* arg,
                      const char* layout) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", arg, " must be ", ndim, "-D ", layout, ", got ",
              t.dim(), "-D tensor of shape ", shape_str(t));
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", a_name, " and ", b_name,
              " must have the same shape, got ", shape_str(a), " and ", shape_str(b));
}

// The dtype an op computes in: the promotion of its float inputs, never below float32.
inline at::ScalarType opmath_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// cam: the GradCAM family. Weight formulas and epsilons follow pytorch-grad-cam so maps match it.
enum class CamMethod : int { GradCAM = 0, GradCAMPlusPlus = 1, XGradCAM = 2, LayerCAM = 3, HiResCAM = 4 };

constexpr double kGradCamPlusPlusEps = 1e-6;  // pytorch-grad-cam GradCAMPlusPlus
constexpr double kXGradCamEps = 1e-7;         // pytorch-grad-cam XGradCAM

inline CamMethod parse_cam_method(std::string_view method) {
  if (method == "gradcam") return CamMethod::GradCAM;
  if (method == "gradcam++") return CamMethod::GradCAMPlusPlus;
  if (method == "xgradcam") return CamMethod::XGradCAM;
  if (method == "layercam") return CamMethod::LayerCAM;
  if (method == "hirescam") return CamMethod::HiResCAM;
  TORCH_CHECK(false, "cam: method must be one of 'gradcam', 'gradcam++', 'xgradcam', 'layercam', "
              "'hirescam', got '", std::string(method), "'");
}

// Methods whose channel weights are computed first (two passes per channel), as opposed to the
// elementwise ones (layercam, hirescam).
inline bool cam_uses_channel_weights(CamMethod m) {
  return m == CamMethod::GradCAM || m == CamMethod::GradCAMPlusPlus || m == CamMethod::XGradCAM;
}

inline void check_cam_inputs(const at::Tensor& activations, const at::Tensor& gradients) {
  check_floating(activations, "cam", "activations");
  check_floating(gradients, "cam", "gradients");
  check_dim(activations, 4, "cam", "activations", "[B, C, h, w]");
  check_dim(gradients, 4, "cam", "gradients", "[B, C, h, w]");
  check_same_shape(activations, "activations", gradients, "gradients", "cam");
  check_same_device(activations, "activations", gradients, "gradients", "cam");
}

// ---------------------------------------------------------------------------------------------
inline void check_upsample_inputs(const at::Tensor& cam, at::IntArrayRef size) {
  check_floating(cam, "upsample_normalize", "cam");
  check_dim(cam, 3, "upsample_normalize", "cam", "[B, h, w]");
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0,
              "upsample_normalize: size must be two positive ints (H, W), got ", size);
  TORCH_CHECK(cam.numel() > 0 || cam.size(0) == 0, "upsample_normalize: cam of shape ",
              shape_str(cam), " has an empty grid; h and w must be positive");
}

// ---------------------------------------------------------------------------------------------
// prototype_assign: features [B, C, h, w] or [N, C]; optional PCA (f - mean) @ components.
struct AssignGeometry {
  int64_t channels;   // C: feature width before projection
  int64_t dims;       // D: width the centroids live in
  int64_t clusters;   // K
};

inline AssignGeometry check_assign_inputs(const at::Tensor& features, const at::Tensor& centroids,
                                          const std::optional<at::Tensor>& mean,
                                          const std::optional<at::Tensor>& components) {
  const char* op = "prototype_assign";
  check_floating(features, op, "features");
  check_floating(centroids, op, "centroids");
  TORCH_CHECK(features.dim() == 4 || features.dim() == 2, op,
              ": features must be [B, C, h, w] or [N, C], got ", features.dim(),
              "-D tensor of shape ", shape_str(features));
  check_dim(centroids, 2, op, "centroids", "[K, D]");
  check_same_device(features, "features", centroids, "centroids", op);
  const int64_t C = features.size(1);
  TORCH_CHECK(centroids.size(0) > 0, op, ": centroids must hold at least one prototype (K >= 1), got shape ",
              shape_str(centroids));
  int64_t D = C;
  if (mean.has_value() && mean->defined()) {
    check_floating(*mean, op, "mean");
    check_same_device(features, "features", *mean, "mean", op);
    TORCH_CHECK(mean->dim() == 1 && mean->size(0) == C, op, ": mean must be [C] = [", C,
                "] (the features' channel count), got shape ", shape_str(*mean));
  }
  if (components.has_value() && components->defined()) {
    check_floating(*components, op, "components");
    check_same_device(features, "features", *components, "components", op);
    TORCH_CHECK(components->dim() == 2 && components->size(0) == C, op,
                ": components must be [C, D] with C = ", C,
                " (the features' channel count), got shape ", shape_str(*components));
    D = components->size(1);
  }
  TORCH_CHECK(centroids.size(1) == D, op, ": centroids must be [K, D] with D = ", D,
              (components.has_value() && components->defined() ? " (the components' width)"
                                                               : " (the features' channel count)"),
              ", got shape ", shape_str(centroids));
  return {C, D, centroids.size(0)};
}

// ---------------------------------------------------------------------------------------------
inline void check_pool_inputs(const at::Tensor& saliency, const at::Tensor& assignment,
                              int64_t num_prototypes) {
  const char* op = "prototype_pool";
  check_floating(saliency, op, "saliency");
  check_dim(saliency, 3, op, "saliency", "[B, h, w]");
  TORCH_CHECK(assignment.scalar_type() == at::kLong || assignment.scalar_type() == at::kInt, op,
              ": assignment must be an int64 (or int32) tensor of prototype indices, got ",
              assignment.scalar_type());
  check_same_shape(saliency, "saliency", assignment, "assignment", op);
  check_same_device(saliency, "saliency", assignment, "assignment", op);
  TORCH_CHECK(num_prototypes > 0, op, ": num_prototypes must be a positive int (K >= 1), got ",
              num_prototypes);
}

inline void check_saliency_pool_inputs(const at::Tensor& features, const at::Tensor& saliency) {
  const char* op = "saliency_pool";
  check_floating(features, op, "features");
  check_floating(saliency, op, "saliency");
  check_dim(features, 4, op, "features", "[B, C, h, w]");
  check_dim(saliency, 3, op, "saliency", "[B, h, w]");
  TORCH_CHECK(saliency.size(0) == features.size(0) && saliency.size(1) == features.size(2) &&
                  saliency.size(2) == features.size(3),
              op, ": saliency must be [B, h, w] = [", features.size(0), ", ", features.size(2), ", ",
              features.size(3), "] to match features ", shape_str(features), ", got ",
              shape_str(saliency));
  check_same_device(features, "features", saliency, "saliency", op);
}

}  // namespace i2x

namespace i2x {

// The promoted dtype of several float tensors (undefined ones skipped). Outputs take this dtype;
// inputs of another dtype are cast to it before a kernel runs, so kernels see one scalar type.
inline at::ScalarType promoted_type(std::initializer_list<const at::Tensor*> tensors) {
  std::optional<at::ScalarType> st;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    st = st ? c10::promoteTypes(*st, t->scalar_type()) : t->scalar_type();
  }
  return *st;
}

}  // namespace i2x
