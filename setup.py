"""Builds labelsmooth_ext._C with torch.utils.cpp_extension.

CPU kernels always; CUDA kernels too when torch was built with CUDA and a CUDA toolkit is found
(tools/cuda_toolkit.py says where it looks, and says so when it finds none), unless
LABELSMOOTH_FORCE_CPU=1. LABELSMOOTH_FORCE_CUDA=1 makes a missing toolkit an error instead of a
CPU-only build. Honours MAX_JOBS (parallel compile jobs) and TORCH_CUDA_ARCH_LIST (default
"8.0;9.0+PTX": A100, H100, and PTX for newer GPUs).
"""

import glob
import importlib.util
import os
import re
import sys

from setuptools import setup

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def read_version():
    with open(os.path.join(ROOT, "labelsmooth_ext", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def load_cuda_toolkit_finder():
    # Loaded by path: a PEP 517 build does not put the source tree on sys.path.
    spec = importlib.util.spec_from_file_location("cuda_toolkit", os.path.join(ROOT, "tools", "cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def want_cuda():
    toolkit = load_cuda_toolkit_finder().cuda_build_toolkit(torch.version.cuda)
    if toolkit is None:
        return False
    # cpp_extension found its own CUDA_HOME at import time (the parent of the nvcc on PATH, wrong for a
    # wrapper script); every nvcc call and include path of the build reads this module variable.
    cpp_extension.CUDA_HOME = str(toolkit)
    return True


def write_build_info(version, cuda_archs):
    """Fills csrc/ls_build_info.h.in (CMakeLists.txt does the same with configure_file)."""
    out_dir = os.path.join(ROOT, "build", "generated")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(ROOT, "csrc", "ls_build_info.h.in")) as f:
        text = f.read()
    for key, value in {
        "LABELSMOOTH_VERSION": version,
        "LABELSMOOTH_TORCH_VERSION": torch.__version__,
        "LABELSMOOTH_CUDA_ARCHS": cuda_archs,
    }.items():
        text = text.replace(f"@{key}@", value)
    path = os.path.join(out_dir, "ls_build_info.h")
    if not os.path.exists(path) or open(path).read() != text:  # keep the timestamp: no needless rebuilds
        with open(path, "w") as f:
            f.write(text)
    return out_dir


def extension():
    with_cuda = want_cuda()
    cuda_archs = ""
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cuda_archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    generated = write_build_info(read_version(), cuda_archs)

    sources = ["csrc/ops.cpp", "csrc/ls_op_common.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for runs on PyTorch's own OpenMP runtime (the torch wheel's libgomp.so.1,
    # which this extension then shares), and it enables the `omp simd` loops.
    # -ffp-contract=off: no fused multiply-adds chosen by the compiler, only those the CPU kernels ask for
    # (csrc/cpu/ls_lanes.h), so the instruction-set copies with FMA (csrc/cpu/ls_isa_*.cpp) round the same way
    # and their results do not depend on which of them runs.
    # -fno-trapping-math: lets the vectorizer turn the loops' selects into blends on AVX2/SSE2 (it
    # changes no result; the code never reads floating-point exception flags).
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    kwargs = dict(
        name="labelsmooth_ext._C",
        include_dirs=[os.path.join(ROOT, "csrc"), generated],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return CppExtension(sources=sources, **kwargs)
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_cuda.cpp"))
    kwargs["extra_compile_args"] = {
        "cxx": cxx_flags + ["-DLABELSMOOTH_WITH_CUDA"],
        "nvcc": ["-O3", "-DLABELSMOOTH_WITH_CUDA", "--expt-relaxed-constexpr"],
    }
    return CUDAExtension(sources=sources, **kwargs)


setup(
    version=read_version(),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
