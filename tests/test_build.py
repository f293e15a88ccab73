"""The build surfaces: the schemas both backends define, and the CMake build of the same library."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import labelsmooth_ext
from labelsmooth_ext import _schemas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registered_schemas_are_the_python_schemas():
    """The compiled extension defines the schemas in C++, the fallback from _schemas.py: they must agree."""
    for schema in _schemas.SCHEMAS:
        name = schema.split("(", 1)[0]
        registered = str(getattr(torch.ops.labelsmooth, name).default._schema)
        assert registered == f"{_schemas.NAMESPACE}::{schema}"


# Run in a fresh interpreter: the ops of the installed extension are already registered in this one.
_CHECK_CMAKE_LIBRARY = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    torch.ops.load_library(sys.argv[1])
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    x = torch.randn(64, 300, generator=g, dtype=torch.float64)
    t = torch.randint(0, 300, (64,), generator=g)
    loss, lse, _ = torch.ops.labelsmooth.ls_cross_entropy_forward(x, t, None, -100, 0.1, 0, None, 1)
    expected = F.cross_entropy(x, t, label_smoothing=0.1)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0), (loss, expected)
    assert torch.allclose(lse, torch.logsumexp(x, 1), rtol=1e-12, atol=0)
    print("cmake library OK")
    """
)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_same_library(tmp_path, gen):
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                 f"-DPython3_EXECUTABLE={sys.executable}", "-DLABELSMOOTH_FORCE_CPU=ON"]
    for command in (configure, ["cmake", "--build", str(build), "-j", jobs]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    (library,) = [p for p in build.iterdir() if p.name.startswith("_C") and p.suffix == ".so"]
    seed = str(int(torch.randint(0, 2**31, (), generator=gen)))
    result = subprocess.run([sys.executable, "-c", _CHECK_CMAKE_LIBRARY, str(library), seed],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "cmake library OK" in result.stdout


# Both build surfaces refuse LABELSMOOTH_FORCE_CUDA when the CUDA kernels cannot be built, naming why,
# before compiling anything. With a CUDA torch the reason would be the toolkit search instead (CI's CUDA
# build job builds with it set, so a toolkit that is not found fails there).
@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA: the refusal needs a CPU-only torch")
def test_setup_py_refuses_force_cuda_without_cuda_torch():
    env = dict(os.environ, LABELSMOOTH_FORCE_CUDA="1")
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "LABELSMOOTH_FORCE_CUDA=1, but the installed torch has no CUDA support" in result.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA: the refusal needs a CPU-only torch")
def test_cmake_refuses_force_cuda_without_cuda_torch(tmp_path):
    configure = ["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), f"-DPython3_EXECUTABLE={sys.executable}",
                 "-DLABELSMOOTH_FORCE_CUDA=ON"]
    result = subprocess.run(configure, capture_output=True, text=True)
    assert result.returncode != 0
    assert "LABELSMOOTH_FORCE_CUDA=ON, but Torch has no CUDA support" in " ".join(result.stderr.split())
