// The op schemas (declared once; each backend registers its kernels in its own file) and the
// pybind11 module i2x._C, whose import loads this library and so registers torch.ops.i2x.*.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <string>

TORCH_LIBRARY(i2x, m) {
  // GradCAM-family map [B, h, w] from activations and gradients [B, C, h, w].
  m.def("cam(Tensor activations, Tensor gradients, str method=\"gradcam\", bool relu=True) -> Tensor");
  // Bilinear resize (align_corners=False) of [B, h, w] to [B, H, W], then per-image min-max.
  m.def("upsample_normalize(Tensor cam, int[2] size, bool normalize=True) -> Tensor");
  // Nearest centroid (after optional PCA projection) per position, and its squared distance.
  m.def("prototype_assign(Tensor features, Tensor centroids, Tensor? mean=None, Tensor? components=None) -> (Tensor, Tensor)");
  // Mean saliency per prototype [B, K] and the number of positions assigned to it [B, K].
  m.def("prototype_pool(Tensor saliency, Tensor assignment, int num_prototypes) -> (Tensor, Tensor)");
  // Saliency-weighted mean of the features [B, C].
  m.def("saliency_pool(Tensor features, Tensor saliency) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = I2X_VERSION;
  info["torch_version"] = I2X_TORCH_VERSION;
#ifdef I2X_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(I2X_CUDA_ARCHS);
#ifdef I2X_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["aten_threads"] = at::get_num_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "i2x compiled kernels; the ops themselves are torch.ops.i2x.*";
  m.def("build_info", &build_info,
        "What this build was compiled with: package and torch version, CUDA and its archs, "
        "OpenMP and the current ATen thread count.");
}
