"""Loads a built labelsmooth_ext._C library (CMake's, or setup.py's) and checks it is a CUDA build: both
ops have a CUDA kernel (and a CPU one), build_info() names the CUDA archs, and the CPU kernel agrees
with F.cross_entropy on random data. Run in a fresh interpreter: loading a library registers its ops.

    python .ci/check_cuda_library.py PATH/TO/_C.so [EXPECTED_ARCHS]
"""

import importlib.util
import random
import sys

import torch
import torch.nn.functional as F

OPS = ("labelsmooth::ls_cross_entropy_forward", "labelsmooth::ls_cross_entropy_backward")
DEFAULT_ARCHS = "8.0;9.0+PTX"


def load(path):
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(path, expected_archs=DEFAULT_ARCHS):
    info = dict(load(path).build_info())
    print(f"{path}: {info}")
    for op in OPS:
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel in {path}"
    assert info["cuda_compiled"], f"{path} was built without CUDA kernels"
    assert info["cuda_archs"] == expected_archs, f"{path} built for {info['cuda_archs']!r}, expected {expected_archs!r}"
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    x = torch.randn(64, 300, generator=g, dtype=torch.float64)
    t = torch.randint(0, 300, (64,), generator=g)
    loss, _, _ = torch.ops.labelsmooth.ls_cross_entropy_forward(x, t, None, -100, 0.1, 0, None, 1)
    expected = F.cross_entropy(x, t, label_smoothing=0.1)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0), (loss, expected)
    print(f"{path}: CUDA and CPU kernels registered for both ops, archs {info['cuda_archs']}, CPU forward correct")


if __name__ == "__main__":
    main(*sys.argv[1:])
