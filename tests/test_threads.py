"""Determinism across thread counts (on every CPU instruction set of the compiled kernels), and a single
OpenMP runtime in the process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import labelsmooth_ext
from labelsmooth_ext import reference

from conftest import REDUCTION_CODES, class_weight, op_backward, op_forward, probability_target, randn
from cpu_isa_paths import ALL_ISAS, running_on

THREAD_COUNTS = (1, 2, 4)

# (shape, target kind): rows < threads with a big K (the row is split), and many rows with a small K.
SHAPES = [
    ((1, 300_007), "class"),
    ((3, 200_003), "class"),
    ((5_000, 7), "class"),
    ((64, 33, 17), "class"),
    ((2, 100_003), "prob"),
    ((777, 19), "prob"),
]


def _inputs(shape, kind, dtype, gen):
    x = randn(shape, gen, dtype, 3.0)
    if kind == "prob":
        target = probability_target(shape, 1, gen, dtype, normalized=True)
    else:
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
        target.view(-1)[1::5] = -100  # never the only row: a NaN mean would compare nothing
    return x, target, class_weight(shape[1], gen, dtype)


def _run(impl, x, target, weight, reduction, grad_output, smoothing=0, softcap=None, grad_lse=None):
    forward, backward = ((op_forward(), op_backward()) if impl.startswith("op")
                         else (reference.ls_cross_entropy_forward, reference.ls_cross_entropy_backward))
    code = REDUCTION_CODES[reduction]
    loss, lse, mass = forward(x, target, weight, -100, 0.1, smoothing, softcap, code)
    grad = backward(grad_output.to(loss.dtype), grad_lse, x, target, weight, lse, mass, -100, 0.1, smoothing, softcap,
                    code)
    return loss, lse, grad


# The compiled op on each instruction set ("op@avx2": skipped where the CPU cannot run, or without the
# extension), and the reference functions that the fallback op runs.
IMPLS = [f"op@{isa}" for isa in ALL_ISAS] + ["reference"]


def _results_per_thread_count(impl, run):
    results = {}
    with running_on(impl.split("@")[1]) if "@" in impl else contextlib.nullcontext():
        for threads in THREAD_COUNTS:
            torch.set_num_threads(threads)
            results[threads] = run()
    return results


def _assert_same_bits(results):
    base = results[THREAD_COUNTS[0]]
    for threads, result in results.items():
        for name, a, b in zip(("loss", "lse", "grad"), base, result):
            assert torch.equal(a, b) and not a.isnan().any(), (
                f"{name} differs between 1 and {threads} threads: max |diff| "
                f"{(a.double() - b.double()).abs().max().item():.3e}"
            )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,kind", SHAPES, ids=[f"{s}-{k}" for s, k in SHAPES])
def test_same_bits_for_any_thread_count(shape, kind, dtype, reduction, impl, gen, restore_num_threads):
    x, target, weight = _inputs(shape, kind, dtype, gen)
    row_shape = shape[:1] + shape[2:]
    grad_output = (torch.rand(row_shape if reduction == "none" else (), generator=gen) + 0.5)
    _assert_same_bits(_results_per_thread_count(impl, lambda: _run(impl, x, target, weight, reduction, grad_output)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,kind", SHAPES, ids=[f"{s}-{k}" for s, k in SHAPES])
def test_same_bits_for_any_thread_count_with_options(shape, kind, dtype, impl, gen, restore_num_threads):
    """Soft-capping, the 'others' convention (class indices) and a gradient reaching the lse."""
    x, target, weight = _inputs(shape, kind, dtype, gen)
    row_shape = shape[:1] + shape[2:]
    grad_output = torch.rand(row_shape, generator=gen) + 0.5
    grad_lse = torch.rand(row_shape, generator=gen) - 0.5
    smoothing = 1 if kind == "class" else 0
    _assert_same_bits(_results_per_thread_count(impl, lambda: _run(
        impl, x, target, weight, "none", grad_output, smoothing=smoothing, softcap=2.5, grad_lse=grad_lse)))


def test_num_threads_is_honoured_and_restored(restore_num_threads, gen):
    torch.set_num_threads(1)
    x, target, weight = _inputs((64, 1000), "class", torch.float32, gen)
    labelsmooth_ext.cross_entropy(x, target, weight)
    assert torch.get_num_threads() == 1, "running the op must not change torch's thread count"
    assert labelsmooth_ext.backend_info()["num_threads"] == 1


_OPENMP_RUNTIME = r"lib(gomp|iomp5|iomp|omp)([-.][^/]*)?\.so[^/]*$"

# Run in a fresh process: other libraries imported by other tests (scikit-learn bundles its own
# libgomp) must not be counted against this package.
_COUNT_RUNTIMES = f"""
import os, re, torch, labelsmooth_ext
x = torch.randn(256, 513)
labelsmooth_ext.cross_entropy(x, torch.randint(0, 513, (256,))).item()
runtimes = set()
for line in open("/proc/self/maps"):
    parts = line.split()
    if len(parts) >= 6 and re.search(r"{_OPENMP_RUNTIME}", os.path.basename(parts[-1])):
        runtimes.add(os.path.realpath(parts[-1]))
print(labelsmooth_ext.backend_info()["backend"], int(torch.backends.openmp.is_available()), *sorted(runtimes))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_single_openmp_runtime_loaded():
    """Two OpenMP runtimes in one process (say torch's bundled libgomp and the system one the
    extension was linked against) each start their own thread pool: oversubscription, and crashes
    with fork. Count distinct runtime files after the kernels have run."""
    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _COUNT_RUNTIMES], cwd=repo_root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    backend, torch_has_openmp, *runtimes = result.stdout.split()
    assert len(runtimes) <= 1, f"several OpenMP runtimes loaded ({backend} backend): {runtimes}"
    if torch_has_openmp == "1":
        assert len(runtimes) == 1, "torch reports OpenMP but no OpenMP runtime is mapped"
