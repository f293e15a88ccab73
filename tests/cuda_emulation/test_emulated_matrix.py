"""The CUDA kernels, run by the CPU emulation (see emulation.py), against float64 F.cross_entropy.

Coverage. Every row mapping (short rows, warp rows, block rows, (N, C, d...) tiles) x every dtype x
every reduction is one case each (48); the other factors (target kind, class weights, ignore_index,
label smoothing, misaligned rows, and the loss options the kernels see: softcap, an upstream gradient of
the lse) rotate through their values with periods that are coprime to the first three factors' and to
each other, so each value meets every mapping and every dtype (ignore_index kinds cycle over the
class-index cases, the 'others' smoothing convention over those with 0 < eps < 1), and each target kind
meets every combination of the options. Then targeted cases: K = 1, 2 and 128256, rows that fill no block
exactly, every ignore_index kind, the grid-stride loops (the AddressSanitizer build caps the grid at two
blocks), the out-of-range target.
The data is fresh on every run (conftest's per-test generators); the emulator's interleaving seed
comes from the same generator.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import emulation
from emulation import Case

pytestmark = pytest.mark.skipif(emulation.GXX is None, reason="g++ not found: the emulated CUDA suite needs it")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAPPINGS = ("short", "warp", "block", "tiles")
REDUCTIONS = ("none", "mean", "sum")
TARGETS = ("index", "probability", "index", "probability_acc", "index")  # period 5
WEIGHTS = (False, True, True, False, True, False, True)  # period 7
IGNORES = ("none", "some", "all", "class")  # cycles over the class-index cases only
EPSILONS = (0.0, 0.1, 1.0, 0.1, 0.1, 0.0, 0.1, 0.1, 1.0, 0.1, 0.1, 0.0, 0.1)  # period 13
# (row_pad, offset) in elements: aligned, odd row stride, first row one element past a 16-byte boundary, both
MISALIGNMENT_KINDS = ((0, 0), (1, 0), (0, 1), (3, 1))
MISALIGNMENTS = tuple(MISALIGNMENT_KINDS[k % 4] for k in range(17))  # period 17
# Caps around the logits' scale (1 to 4 standard deviations), so that some logits are deep in the tanh's tails.
SOFTCAPS = (None, 2.5, None, 1.5, 4.0, None, 2.5, 1.5, None, 4.0, None)  # period 11
GRAD_LSES = tuple(k % 3 != 1 for k in range(19))  # period 19


def mapping_shape(mapping: str, dtype: torch.dtype, rng: random.Random) -> tuple[int, int, int]:
    """(outer, classes, inner) of a small problem that the kernels map the given way; row counts are
    never a multiple of the rows per block (32 short rows, 4 warp rows, 32 tile rows)."""
    per_vector = 16 // torch.tensor([], dtype=dtype).element_size()
    if mapping == "short":
        return rng.choice((37, 45, 70)), rng.randint(2, 32 * per_vector), 1
    if mapping == "warp":
        return rng.choice((5, 7, 9)), rng.randint(32 * per_vector + 1, 512 * per_vector), 1
    if mapping == "block":
        return rng.choice((2, 3)), rng.randint(512 * per_vector + 1, 1500 * per_vector), 1
    return rng.choice((1, 2)), rng.randint(2, 40), rng.choice((33, 45, 70))


def matrix_cases() -> list[Case]:
    rng = random.Random(12)
    cases = []
    index_cases = smoothed_index_cases = 0
    for i, (mapping, dtype, reduction) in enumerate(itertools.product(MAPPINGS, DTYPES, REDUCTIONS)):
        outer, classes, inner = mapping_shape(mapping, dtype, rng)
        target = TARGETS[i % len(TARGETS)]
        eps = EPSILONS[i % len(EPSILONS)]
        row_pad, offset = MISALIGNMENTS[i % len(MISALIGNMENTS)]
        ignore = IGNORES[index_cases % len(IGNORES)] if target == "index" else "none"
        index_cases += target == "index"
        # 'others' with eps = 1 would be eps * K / (K - 1) > 1 in PyTorch's convention, which F.cross_entropy refuses.
        smoothing = "uniform"
        if target == "index" and 0 < eps < 1:
            smoothing = "others" if smoothed_index_cases % 2 == 0 else "uniform"
            smoothed_index_cases += 1
        cases.append(Case(dtype=dtype, outer=outer, classes=classes, inner=inner, row_pad=row_pad, offset=offset,
                          target=target, weight=WEIGHTS[i % len(WEIGHTS)], ignore=ignore, eps=eps,
                          reduction=reduction, smoothing=smoothing, softcap=SOFTCAPS[i % len(SOFTCAPS)],
                          grad_lse=GRAD_LSES[i % len(GRAD_LSES)]))
    return cases


MATRIX = matrix_cases()


def test_matrix_covers_every_value_with_every_mapping_and_dtype():
    """Guards the rotation above: a factor added or resized later cannot silently lose coverage."""
    def mapping_of(case):
        if case.inner > 1:
            return "tiles"
        vectors = -(-case.classes * torch.tensor([], dtype=case.dtype).element_size() // 16)
        return "short" if vectors <= 32 else "warp" if vectors <= 512 else "block"

    cells = {(mapping_of(c), c.dtype, c.reduction) for c in MATRIX}
    assert cells == set(itertools.product(MAPPINGS, DTYPES, REDUCTIONS))
    for name, values in (("target", TARGETS), ("weight", WEIGHTS), ("eps", EPSILONS),
                         ("misalignment", MISALIGNMENTS), ("softcap", SOFTCAPS), ("grad_lse", GRAD_LSES)):
        for first, first_values in (("mapping", MAPPINGS), ("dtype", DTYPES)):
            seen = {(mapping_of(c) if first == "mapping" else c.dtype,
                     (c.row_pad, c.offset) if name == "misalignment" else getattr(c, name)) for c in MATRIX}
            missing = set(itertools.product(first_values, set(values))) - seen
            assert not missing, f"{first} x {name} pairs never run: {missing}"
    index_cases = [c for c in MATRIX if c.target == "index"]
    assert {(mapping_of(c), c.ignore) for c in index_cases} == set(itertools.product(MAPPINGS, set(IGNORES)))
    others = [c for c in MATRIX if c.smoothing == "others"]
    assert {mapping_of(c) for c in others} == set(MAPPINGS) and {c.dtype for c in others} == set(DTYPES)
    for target in set(TARGETS):
        combinations = {(c.softcap is not None, c.grad_lse) for c in MATRIX if c.target == target}
        assert combinations == set(itertools.product((False, True), (False, True))), (target, combinations)


@pytest.fixture(scope="module")
def counted_driver():
    return emulation.build_driver("counted")


@pytest.fixture(scope="module")
def asan_driver():
    return emulation.build_driver("asan", defines=emulation.SMALL_GRID_DEFINES)


def interleaving_seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (), generator=gen))


@pytest.mark.parametrize("case", MATRIX, ids=Case.id)
def test_matrix(case, counted_driver, gen):
    emulation.run_and_check(counted_driver, case, gen, interleaving_seed(gen))


TARGETED = [
    Case(outer=6, classes=1, eps=0.1, reduction="none"),
    Case(dtype=torch.float16, outer=5, classes=1, weight=True, eps=1.0, reduction="mean"),
    Case(dtype=torch.bfloat16, outer=2, classes=128256, weight=True, eps=0.1, reduction="mean"),
    Case(dtype=torch.float32, outer=1, classes=128256, offset=1, eps=0.0, reduction="sum"),
    Case(dtype=torch.bfloat16, outer=2, classes=128256, target="probability", softcap=30.0, grad_lse=True,
         reduction="mean"),
    Case(dtype=torch.float32, outer=6, classes=2, smoothing="others", eps=0.3, grad_lse=True, reduction="sum"),
    Case(dtype=torch.float32, outer=65, classes=7, ignore="some", reduction="mean"),
    Case(dtype=torch.float32, outer=33, classes=3, inner=1, ignore="all", reduction="mean"),
    Case(dtype=torch.float32, outer=2, classes=5, inner=33, ignore="all", weight=True, reduction="mean"),
    Case(dtype=torch.float64, outer=3, classes=5, inner=20, ignore="class", weight=True, reduction="none"),
]


@pytest.mark.parametrize("case", TARGETED, ids=Case.id)
def test_targeted(case, counted_driver, gen):
    emulation.run_and_check(counted_driver, case, gen, interleaving_seed(gen))


# More rows than two blocks of each mapping, under AddressSanitizer + UBSan with the grid capped at two
# blocks, so every kernel loops over its rows (and the partial sums of mean/sum come from a capped grid).
GRID_STRIDE = [
    Case(dtype=torch.float32, outer=131, classes=20, target="index", ignore="some", weight=True, reduction="mean"),
    Case(dtype=torch.bfloat16, outer=11, classes=700, target="probability", reduction="sum", offset=1, softcap=2.0,
         grad_lse=True),
    Case(dtype=torch.float16, outer=5, classes=9000, target="index", eps=0.1, reduction="mean", row_pad=3,
         smoothing="others", softcap=3.0),
    Case(dtype=torch.float64, outer=3, classes=6, inner=70, target="probability_acc", weight=True, reduction="mean"),
    Case(dtype=torch.float32, outer=2, classes=9, inner=80, target="index", ignore="class", reduction="none"),
]


@pytest.mark.parametrize("case", GRID_STRIDE, ids=Case.id)
def test_grid_stride_loops_under_address_sanitizer(case, asan_driver, gen):
    emulation.run_and_check(asan_driver, case, gen, interleaving_seed(gen))


@pytest.mark.parametrize("flavour", ("counted", "asan"))
@pytest.mark.parametrize("weight", (False, True))
def test_out_of_range_target_asserts_and_reads_nothing_out_of_bounds(flavour, weight, gen):
    """The device-side assert makes the launch fail; the emulated assert returns (a GPU's would not), so
    any read with the bad index after it shows as an out-of-bounds access (exact bounds in the counted
    build, AddressSanitizer in the other)."""
    driver = emulation.build_driver(flavour, defines=emulation.SMALL_GRID_DEFINES if flavour == "asan" else ())
    case = Case(outer=9, classes=6, weight=weight, reduction="mean")
    inputs = emulation.make_inputs(case, gen)
    inputs.target[4] = 6 if weight else -3
    result = emulation.run(driver, case, inputs, interleaving_seed(gen))
    assert result.returncode == emulation.LAUNCH_FAILED, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert "device-side assert in kernel" in result.stderr and "check_targets_kernel" in result.stderr
    assert "device-side assert triggered" in result.stderr
    assert "out-of-bounds" not in result.stderr and "AddressSanitizer" not in result.stderr


# Every row kernel (and the small reductions) under ThreadSanitizer: a race on shared memory between the
# threads of a block (a missing or misplaced __syncthreads) fails the run.
RACE_CASES = [
    Case(dtype=torch.float32, outer=37, classes=20, target="index", weight=True, ignore="some", reduction="mean"),
    Case(dtype=torch.bfloat16, outer=5, classes=700, target="probability", reduction="sum"),
    Case(dtype=torch.float32, outer=2, classes=3000, target="probability_acc", weight=True, reduction="mean",
         softcap=2.0, grad_lse=True),
    Case(dtype=torch.float16, outer=2, classes=7, inner=40, target="index", eps=0.1, reduction="none", grad_lse=True),
]


@pytest.mark.parametrize("case", RACE_CASES, ids=Case.id)
def test_no_races_under_thread_sanitizer(case, gen):
    driver = emulation.build_driver("tsan", defines=emulation.SMALL_GRID_DEFINES)
    emulation.run_and_check(driver, case, gen, interleaving_seed(gen))
