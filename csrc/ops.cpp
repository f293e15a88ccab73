// The op schemas of the `labelsmooth` namespace, and the pybind11 module `_C` that carries the build
// information behind labelsmooth_ext.backend_info(). The loss itself only goes through the dispatcher:
// Python never passes data pointers through pybind11 (that would bypass autograd and torch.compile).
//
// This uses the regular (non-stable) LibTorch API: the CPU kernels need at::parallel_for, which runs on
// PyTorch's own OpenMP thread pool (honouring torch.set_num_threads, no second pool competing for the
// cores); the stable ABI has no equivalent yet.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/ls_cpu_isa.h"
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
  pybind11::list isas;
  for (auto isa : labelsmooth::cpu::supported_isas()) isas.append(labelsmooth::cpu::isa_name(isa));
  info["cpu_isas"] = isas;
  return info;
}

// A bad LABELSMOOTH_CPU_ISA or name raises ValueError in Python, as it does through the ops.
template <typename Fn>
auto value_errors_to_python(Fn fn) {
  try {
    return fn();
  } catch (const c10::ValueError& error) {
    throw pybind11::value_error(error.what_without_backtrace());
  }
}

std::string cpu_isa() {
  return value_errors_to_python([] { return std::string(labelsmooth::cpu::isa_name(labelsmooth::cpu::active_isa())); });
}

void set_cpu_isa(const std::string& name) {
  value_errors_to_python([&] { labelsmooth::cpu::set_active_isa(name); });
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "labelsmooth_ext compiled kernels (the ops live in torch.ops.labelsmooth)";
  module.def("build_info", &build_info,
             "How this extension was built: versions, CUDA archs, OpenMP, the CPU instruction sets it can run here.");
  module.def("cpu_isa", &cpu_isa, "The instruction set whose CPU kernels the ops run: avx512, avx2 or baseline.");
  module.def("set_cpu_isa", &set_cpu_isa, pybind11::arg("name"),
             "Runs the CPU kernels of this instruction set from now on (avx512, avx2, baseline, or auto for the "
             "best this CPU supports); ValueError if unknown or not supported here.");
}
