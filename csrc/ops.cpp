// The op schemas of the `labelsmooth` namespace, and the pybind11 module `_C` that carries the build
// information behind labelsmooth_ext.backend_info(). The loss itself only goes through the dispatcher:
// Python never passes data pointers through pybind11 (that would bypass autograd and torch.compile).
//
// This uses the regular (non-stable) LibTorch API: the CPU kernels need at::parallel_for, which runs on
// PyTorch's own OpenMP thread pool (honouring torch.set_num_threads, no second pool competing for the
// cores); the stable ABI has no equivalent yet.
#include <torch/extension.h>
#include <torch/library.h>

#include "ls_build_info.h"

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(labelsmooth, m) {
  // Keep in sync with labelsmooth_ext/_schemas.py (a test compares them).
  m.def(
      "ls_cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int smoothing, float? softcap, int reduction) -> (Tensor loss, Tensor lse, "
      "Tensor target_mass)");
  m.def(
      "ls_cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor target_mass, int ignore_index, float label_smoothing, int smoothing, float? softcap, "
      "int reduction) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = LABELSMOOTH_VERSION;
  info["torch_version"] = LABELSMOOTH_TORCH_VERSION;
#ifdef LABELSMOOTH_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_archs"] = LABELSMOOTH_CUDA_ARCHS;
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "labelsmooth_ext compiled kernels (the ops live in torch.ops.labelsmooth)";
  module.def("build_info", &build_info, "How this extension was built: versions, CUDA archs, OpenMP.");
}
