"""The CUDA kernel files compile with a bare nvcc (no torch, no GPU) for sm_80 and sm_90, and ptxas
reports no register spills for any kernel.

This runs wherever nvcc exists (CI has it, with a CPU-only torch), so a kernel that stops compiling
or starts spilling is caught without a GPU. Both architectures go through one nvcc call per file, and
the files compile in parallel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_FILES = sorted((CSRC / "cuda").glob("*_kernels.cu"))
ARCHS = ("80", "90")
NO_SPILLS = "0 bytes spill stores, 0 bytes spill loads"


def find_nvcc() -> str | None:
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return None


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in $CUDA_HOME/bin")


def compile_kernels(source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    gencode = [f for arch in ARCHS for f in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    command = [NVCC, "-std=c++17", "-I", str(CSRC), *gencode, "-Xptxas", "-v", "-c", str(source),
               "-o", str(out_dir / (source.stem + ".o"))]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cuda_kernels")
    with ThreadPoolExecutor(max_workers=max(len(KERNEL_FILES), 1)) as pool:
        results = pool.map(lambda source: compile_kernels(source, out_dir), KERNEL_FILES)
        return dict(zip(KERNEL_FILES, results))


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    demangled = result.stdout.splitlines()
    return demangled if result.returncode == 0 and len(demangled) == len(names) else names


def ptxas_report(output: str) -> list[dict]:
    """One entry per (kernel, arch): registers and the spill line, from `ptxas -v` output."""
    kernels = []
    for line in output.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if entry:
            kernels.append({"name": entry.group(1), "arch": entry.group(2), "registers": None, "spills": None})
            continue
        if not kernels:
            continue
        registers = re.search(r"Used (\d+) registers", line)
        if registers:
            kernels[-1]["registers"] = int(registers.group(1))
        spills = re.search(r"\d+ bytes spill stores, \d+ bytes spill loads", line)
        if spills:
            kernels[-1]["spills"] = spills.group(0)
    return kernels


def test_there_are_kernel_files():
    assert KERNEL_FILES, f"no *_kernels.cu under {CSRC / 'cuda'}"


@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_compiles_without_spills(source, compiled):
    result = compiled[source]
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stdout}\n{result.stderr}"
    kernels = ptxas_report(result.stdout + result.stderr)
    assert kernels, f"no ptxas -v report for {source.name}:\n{result.stderr}"
    names = demangle([k["name"] for k in kernels])
    for kernel, name in zip(kernels, names):
        print(f"{kernel['arch']} {kernel['registers']:>4} registers  {name}")
    for arch in ARCHS:
        assert any(k["arch"] == f"sm_{arch}" for k in kernels), f"nothing compiled for sm_{arch}"
    spilling = [f"{k['arch']} {name}: {k['spills']}" for k, name in zip(kernels, names)
                if k["spills"] is not None and k["spills"] != NO_SPILLS]
    assert not spilling, "ptxas reports register spills:\n" + "\n".join(spilling)
