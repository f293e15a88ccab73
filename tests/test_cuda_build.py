"""The extension in use is a CUDA build when torch has CUDA: both ops have a CUDA kernel registered and
backend_info() reports the archs it was built for. Needs no GPU: CI's CUDA build job runs the suite
with torch 2.13.0+cu130 on a machine without one, and sets LABELSMOOTH_EXPECT_CUDA_BUILD=1 so that these
tests fail there rather than skip. With a CPU-only torch they skip.
"""

import os

import pytest
import torch

import labelsmooth_ext

EXPECTED = os.environ.get("LABELSMOOTH_EXPECT_CUDA_BUILD", "0") == "1"
OPS = ("labelsmooth::ls_cross_entropy_forward", "labelsmooth::ls_cross_entropy_backward")
# What setup.py builds for when TORCH_CUDA_ARCH_LIST is unset, and what CI's job asks for explicitly.
DEFAULT_ARCHS = ["8.0", "9.0+PTX"]


@pytest.fixture(autouse=True)
def _cuda_build_expected():
    if EXPECTED:
        assert torch.version.cuda is not None, f"LABELSMOOTH_EXPECT_CUDA_BUILD=1 with torch {torch.__version__}"
        return
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} has no CUDA")
    if not labelsmooth_ext.backend_info()["cuda_compiled"]:
        pytest.skip(f"this build has no CUDA kernels: {labelsmooth_ext.backend_info()['reason']}")


def test_backend_info_reports_the_cuda_archs():
    info = labelsmooth_ext.backend_info()
    assert info["backend"] == "compiled", info["reason"]
    assert info["cuda_compiled"] is True
    expected = os.environ.get("TORCH_CUDA_ARCH_LIST")
    assert info["cuda_archs"] == (expected.replace(",", ";").split(";") if expected else DEFAULT_ARCHS)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("key", ["CUDA", "CPU"])
def test_op_has_a_kernel(op, key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
