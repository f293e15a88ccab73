"""Every instruction-set copy of the CPU kernels (AVX-512, AVX2, baseline) that this machine can run:
each against the float64 PyTorch reference over the correctness matrix and every kernel path, the copies
with fused multiply-adds (AVX-512, AVX2) bit-identical to each other, and the ways of choosing one
(LABELSMOOTH_CPU_ISA, set_cpu_isa)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import labelsmooth_ext

from conftest import (REDUCTION_CODES, accumulation_dtype, grad_output_like, op_backward, op_forward, randn,
                      skip_unless_compiled)
from cpu_isa_paths import ALL_ISAS, compiled_module, running_on, supported_fma_isas, supported_isas
from test_matrix import CASES, CORE_CASES, DTYPES, _case_id, build_case, check_against_float64
import test_options

REPO_ROOT = Path(__file__).resolve().parents[1]

# Cases that reach every kernel path, beyond the matrix's K <= 4099: rows of several chunks (8192
# logits each), a row split over threads (fewer rows than threads), tiles of short (N, C) rows (K = 7:
# copied element by element; K = 10: in blocks of 8 x 8, the last block of classes overlapping, in both
# passes) and of (N, C, d) rows, probability targets on each, with and without weights.
KERNEL_PATH_CASES = [
    {"dtype": dtype, "reduction": "none", "weight": weight, "eps": 0.1, "target": target, "ignore": ignore,
     "K": k, "shape": shape, "layout": layout}
    for dtype in ("fp32", "bf16", "fp16", "fp64")
    for weight in ("none", "random")
    for target, ignore in (("int64", "some"), ("prob", "none"))
    for k, shape, layout in ((3 * 8192 + 17, "NC", "sliced"), (2 * 8192 + 5, "C", "contiguous"),
                             (7, "NC", "contiguous"), (10, "NC", "sliced"), (33, "NCd", "contiguous"),
                             (300, "NC", "contiguous"))
    if not (shape == "C" and ignore == "some")
]


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("case", CASES + CORE_CASES + KERNEL_PATH_CASES,
                         ids=[_case_id(c) for c in CASES + CORE_CASES + KERNEL_PATH_CASES])
def test_each_isa_matches_float64_reference(isa, case, gen, restore_num_threads):
    if case not in KERNEL_PATH_CASES and compiled_module() is not None and isa == compiled_module().cpu_isa():
        pytest.skip("the active instruction set runs this case in test_matrix.py already")
    torch.set_num_threads(2)  # so that single long rows take the split-row path
    inputs = build_case(case, gen)
    with running_on(isa):
        check_against_float64("compiled_op", inputs)


def _op_results(inputs):
    logits, target, weight, ignore_index, reduction, eps, grad_output = inputs
    code = REDUCTION_CODES[reduction]
    loss, lse, mass = op_forward()(logits, target, weight, ignore_index, eps, 0, None, code)
    grad = op_backward()(grad_output.to(loss.dtype), None, logits, target, weight, lse, mass, ignore_index, eps, 0,
                         None, code)
    return {"loss": loss, "lse": lse, "grad": grad}


@pytest.mark.parametrize("case", KERNEL_PATH_CASES + CORE_CASES[::5],
                         ids=[_case_id(c) for c in KERNEL_PATH_CASES + CORE_CASES[::5]])
def test_fma_isas_give_the_same_bits(case, gen, restore_num_threads):
    """The copies with FMA compute the same operations in the same order on 16-lane fp32 (8-lane fp64)
    vectors whatever the register width, -ffp-contract=off leaves the compiler no fusing of its own, and
    they fuse the same multiply-adds (ls_lanes.h, mul_add), so their results must be bit-identical, not
    merely within tolerance. (The baseline copy rounds those steps twice; it is checked against float64.)"""
    isas = supported_fma_isas()
    if len(isas) < 2:
        pytest.skip(f"only {isas} of the copies with FMA can run here: nothing to compare")
    torch.set_num_threads(2)
    inputs = build_case(case, gen)
    results = {}
    for isa in isas:
        with running_on(isa):
            results[isa] = _op_results(inputs)
    first = isas[0]
    for isa in isas[1:]:
        for name, value in results[isa].items():
            expected = results[first][name]
            assert torch.equal(value, expected), (
                f"{name} of {isa} differs from {first}: max |diff| "
                f"{(value.double() - expected.double()).abs().max().item():.3e}")


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Tiles of short rows in both passes (copied element by element, in blocks), in the forward only, none.
@pytest.mark.parametrize("num_classes", [7, 10, 33, 300])
def test_ignored_rows_with_extreme_logits_get_exactly_zero_gradient(isa, dtype, num_classes, gen):
    """Ignored rows are computed alongside the others in a tile and then discarded; logits far outside the
    exp's range (1000, +-inf, NaN) there must neither leak into them nor disturb the valid rows."""
    logits = torch.randn(70, num_classes, generator=gen).to(dtype)
    target = torch.randint(0, num_classes, (70,), generator=gen)
    extreme = torch.tensor([1000.0, float("inf"), float("-inf"), float("nan")])
    ignored = torch.arange(0, 70, 9)
    logits[ignored, : len(extreme)] = extreme.to(dtype)
    target[ignored] = -100
    valid = target != -100

    def loss_and_grad(rows_logits, rows_target):
        code = REDUCTION_CODES["sum"]
        loss, lse, mass = op_forward()(rows_logits, rows_target, None, -100, 0.1, 0, None, code)
        grad = op_backward()(torch.ones((), dtype=loss.dtype), None, rows_logits, rows_target, None, lse, mass,
                             -100, 0.1, 0, None, code)
        return loss, grad

    with running_on(isa):
        loss, grad = loss_and_grad(logits, target)
        _, grad_of_valid_rows = loss_and_grad(logits[valid], target[valid])
    assert torch.isfinite(loss)
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    # A row's gradient ('sum': upstream 1) depends on that row alone, so the same bits as without the others.
    assert torch.equal(grad[valid], grad_of_valid_rows)


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("num_classes", [8, 10, 12, 40])
def test_short_row_tiles_match_float64_reference(isa, dtype, num_classes, gen):
    """Tiles of short (N, C) rows are copied to and from class-major tiles in blocks of 8 rows x 8 classes
    (the last block of classes overlapping the one before it unless K is a multiple of 8), the rows left
    over element by element. 75 rows: two whole tiles of 32 rows, then one of 11 (a block and 3 rows).
    K = 8 .. 12 takes the tiles in both passes, K = 40 in the forward only."""
    rows = 75
    logits = randn((rows, num_classes), gen, DTYPES[dtype], scale=3.0)
    target = torch.randint(0, num_classes, (rows,), generator=gen)
    target[torch.randperm(rows, generator=gen)[:9]] = -100
    inputs = (logits, target, None, -100, "none", 0.1, grad_output_like((rows,), gen))
    with running_on(isa):
        check_against_float64("compiled_op", inputs)


# The options the kernels see (soft-capping, the 'others' eps, a gradient reaching the lse), combined as in
# tests/test_options.py, on a subset of the kernel paths.
KERNEL_OPTION_SETS = [
    (name, options) for name, options in test_options.OPTION_SETS if name in ("z_loss+softcap+others", "softcap+lse+normalizer")
]
KERNEL_PATH_OPTION_CASES = KERNEL_PATH_CASES[::3]


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("option_name,options", KERNEL_OPTION_SETS, ids=[n for n, _ in KERNEL_OPTION_SETS])
@pytest.mark.parametrize("case", KERNEL_PATH_OPTION_CASES, ids=[_case_id(c) for c in KERNEL_PATH_OPTION_CASES])
def test_each_isa_matches_float64_composition_with_options(isa, case, option_name, options, gen,
                                                           restore_num_threads):
    torch.set_num_threads(2)
    with running_on(isa):
        # The option tests' own check (that module runs it on the active copy only).
        test_options.test_option_against_float64_composition(case, option_name, options, gen)


def _op_results_with_options(inputs, softcap, smoothing, grad_lse):
    logits, target, weight, ignore_index, reduction, eps, grad_output = inputs
    code = REDUCTION_CODES[reduction]
    loss, lse, mass = op_forward()(logits, target, weight, ignore_index, eps, smoothing, softcap, code)
    grad = op_backward()(grad_output.to(loss.dtype), grad_lse, logits, target, weight, lse, mass, ignore_index, eps,
                         smoothing, softcap, code)
    return {"loss": loss, "lse": lse, "target_mass": mass, "grad": grad}


@pytest.mark.parametrize("case", KERNEL_PATH_CASES, ids=[_case_id(c) for c in KERNEL_PATH_CASES])
def test_fma_isas_give_the_same_bits_with_options(case, gen, restore_num_threads):
    """Soft-capping (the vectorized tanh), the 'others' convention and a gradient through the lse keep the
    copies with FMA bit-identical too."""
    isas = supported_fma_isas()
    if len(isas) < 2:
        pytest.skip(f"only {isas} of the copies with FMA can run here: nothing to compare")
    torch.set_num_threads(2)
    inputs = build_case(case, gen)
    logits, target = inputs[0], inputs[1]
    smoothing = 0 if target.is_floating_point() else 1
    row_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    grad_lse = torch.rand(row_shape, generator=gen, dtype=accumulation_dtype(logits.dtype)) - 0.5
    results = {}
    for isa in isas:
        with running_on(isa):
            results[isa] = _op_results_with_options(inputs, 2.5, smoothing, grad_lse)
    first = isas[0]
    for isa in isas[1:]:
        for name, value in results[isa].items():
            assert torch.equal(value, results[first][name]), f"{name} of {isa} differs from {first}"


def test_backend_info_names_the_isa_in_use():
    skip_unless_compiled()
    info = labelsmooth_ext.backend_info()
    assert info["cpu_isa"] in info["cpu_isas"], info
    assert info["cpu_isas"][-1] == "baseline", "the baseline copy must always be runnable"
    for isa in info["cpu_isas"]:
        with running_on(isa):
            assert labelsmooth_ext.backend_info()["cpu_isa"] == isa


def test_set_cpu_isa_rejects_unknown_and_unsupported_names():
    skip_unless_compiled()
    module = compiled_module()
    before = module.cpu_isa()
    with pytest.raises(ValueError, match=r"'avx9000' is not a known instruction set: expected one of avx512"):
        module.set_cpu_isa("avx9000")
    unsupported = [isa for isa in ALL_ISAS if isa not in supported_isas()]
    for isa in unsupported:
        with pytest.raises(ValueError, match=rf"asks for the {isa} kernels, which this (CPU cannot run|build "
                                             rf"does not have); supported here: "):
            module.set_cpu_isa(isa)
    assert module.cpu_isa() == before, "a rejected request must leave the active copy as it was"


_REPORT_ISA = """
import torch, labelsmooth_ext
x = torch.randn(64, 1000)
loss = labelsmooth_ext.cross_entropy(x, torch.randint(0, 1000, (64,)), label_smoothing=0.1)
print(labelsmooth_ext.backend_info()["cpu_isa"], float(loss))
"""


def _run_with_environment(value):
    env = dict(os.environ, LABELSMOOTH_CPU_ISA=value, LABELSMOOTH_BACKEND="compiled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", _REPORT_ISA], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_environment_variable_selects_the_isa():
    skip_unless_compiled()
    for isa in supported_isas():
        result = _run_with_environment(isa)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[0] == isa
    result = _run_with_environment("auto")
    assert result.returncode == 0 and result.stdout.split()[0] == supported_isas()[0], result.stderr[-3000:]


@pytest.mark.parametrize("value", ["sse9", "avx512", "AVX2"])
def test_environment_variable_with_a_bad_value_fails_clearly(value):
    skip_unless_compiled()
    if value in supported_isas():
        pytest.skip(f"{value} runs here")
    result = _run_with_environment(value)
    assert result.returncode != 0, f"LABELSMOOTH_CPU_ISA={value} was accepted: {result.stdout}"
    assert f"LABELSMOOTH_CPU_ISA={value}" in result.stderr and "ValueError" in result.stderr, result.stderr[-3000:]
