"""Global memory traffic of the CUDA kernels against the design's floor, counted by the emulator.

What is counted: the bytes of every load and store a thread issues to a global buffer (the counting
build instruments the kernel file; see emulation.py). A GPU serves a warp's loads of one address with
one transaction, so a per-row scalar (target, lse, upstream gradient, scratch) read once by each thread
that works on the row costs O(rows), not O(elements); the floor allows that and nothing more:
  * forward: each logit of a row that is not ignored is read exactly once; probability targets once;
  * backward: the same logits read exactly once, each gradient element written exactly once; probability
    targets once (the forward saves each row's target mass, which the backward reads per row);
  * the options add no reads per element: softcap is applied to each logit as it is read, and the upstream
    gradient of the lse and the target mass are per-row values;
  * per-row buffers: at most one element per thread working on the row (4 threads for short rows, a warp
    for warp rows, a block for block rows, 8 class slices for tiles); scratch: at most two;
  * class weights: the smoothing term needs w_c next to every logit, so with label smoothing (and with
    probability targets) each pass reads the fp32 weight vector once per row, element by element: that
    is 2x the logit bytes for bf16 logits, served from cache (the vector is K * 4 bytes for all rows).
    Without smoothing the class-index kernels read only w[y] per row. The bound is exact: once per row.
  * the small kernels (target check, weight total, final reduction) read O(rows + classes) and never
    touch the logits or the gradient.
Each bound holds with and without the options.
"""

from __future__ import annotations

import pytest
import torch

import emulation
from emulation import Case

pytestmark = pytest.mark.skipif(emulation.GXX is None, reason="g++ not found: the emulated CUDA suite needs it")

ROW_KERNELS = ("grouped_rows_kernel", "block_rows_kernel", "inner_tiles_kernel")
THREADS_PER_ROW = {"short": 4, "warp": 32, "block": 256, "tiles": 8}


def mapping_case(mapping: str, **kwargs) -> Case:
    """bf16 problems (where the weights cost the most) of each row mapping."""
    shapes = {"short": (45, 50, 1), "warp": (7, 1000, 1), "block": (3, 5000, 1), "tiles": (2, 10, 45)}
    outer, classes, inner = shapes[mapping]
    return Case(dtype=torch.bfloat16, outer=outer, classes=classes, inner=inner, **kwargs)


def split_traffic(traffic, direction: str):
    """(bytes per buffer of the row kernel of `direction`, list of the other launches' traffic)."""
    rows = [buffers for kernel, buffers in traffic
            if direction + "_" in kernel and any(k in kernel for k in ROW_KERNELS)]
    assert len(rows) == 1, f"expected one {direction} row kernel launch, got {[k for k, _ in traffic]}"
    small = [(kernel, buffers) for kernel, buffers in traffic if not any(k in kernel for k in ROW_KERNELS)]
    return rows[0], small


def floors(case: Case, inputs: emulation.Inputs, mapping: str):
    rows = case.outer * case.inner
    elem = torch.tensor([], dtype=case.dtype).element_size()
    acc = torch.tensor([], dtype=emulation.accumulation_dtype(case.dtype)).element_size()
    if case.target == "index":
        valid = int((inputs.target != inputs.ignore_index).sum())
        target_elem = 8
    else:
        valid = rows
        target_elem = inputs.target.element_size()
    per_row = rows * THREADS_PER_ROW[mapping]
    return dict(rows=rows, valid=valid, K=case.classes, elem=elem, acc=acc, target_elem=target_elem, per_row=per_row)


def read(buffers, name):
    return buffers.get(name, (0, 0))[0]


def written(buffers, name):
    return buffers.get(name, (0, 0))[1]


def check_small_kernels(small, f):
    for kernel, buffers in small:
        assert "logits" not in buffers and "grad" not in buffers, f"{kernel} touches the logits or gradient: {buffers}"
        total = sum(r + w for r, w in buffers.values())
        bound = f["rows"] * (8 + 2 * f["acc"]) + f["K"] * f["acc"] + 64 * f["acc"]
        assert total <= bound, f"{kernel}: {total} bytes > O(rows + classes) bound {bound}: {buffers}"


def check_forward(case, f, buffers):
    assert read(buffers, "logits") == f["valid"] * f["K"] * f["elem"], f"forward logits reads {buffers}"
    assert written(buffers, "logits") == 0
    if case.target == "index":
        assert read(buffers, "target") <= f["per_row"] * 8, buffers
        weight_floor = f["valid"] * f["K"] * f["acc"] if case.eps > 0 else 0
        weight_bound = weight_floor + f["rows"] * f["acc"]  # w[y] of each valid row, in finish
    else:
        assert read(buffers, "target") == f["rows"] * f["K"] * f["target_elem"], f"target reads {buffers}"
        weight_floor = weight_bound = f["rows"] * f["K"] * f["acc"]
    if case.weight:
        assert weight_floor <= read(buffers, "weight") <= weight_bound, f"weight reads {buffers}"
    assert written(buffers, "lse") == f["rows"] * f["acc"] and read(buffers, "lse") == 0
    mass_bytes = 0 if case.target == "index" else f["rows"] * f["acc"]
    assert written(buffers, "target_mass") == mass_bytes and read(buffers, "target_mass") == 0, buffers
    loss_bytes = f["rows"] * f["acc"] if case.reduction == "none" else 0
    assert written(buffers, "loss") == loss_bytes and read(buffers, "loss") == 0


def check_backward(case, f, buffers):
    assert read(buffers, "logits") == f["valid"] * f["K"] * f["elem"], f"backward logits reads {buffers}"
    assert written(buffers, "grad") == f["rows"] * f["K"] * f["elem"], f"gradient writes {buffers}"
    assert read(buffers, "grad") == 0 and written(buffers, "logits") == 0
    for name in ("lse", "grad_loss", "grad_lse", "target_mass"):
        assert read(buffers, name) <= f["per_row"] * f["acc"], f"{name} reads {buffers}"
    assert written(buffers, "target_mass") == 0, buffers
    assert read(buffers, "scratch") <= 2 * f["per_row"] * f["acc"], f"scratch reads {buffers}"
    if case.target == "index":
        assert read(buffers, "target") <= f["per_row"] * 8, buffers
        weight_floor = f["valid"] * f["K"] * f["acc"] if case.eps > 0 else 0
        weight_bound = weight_floor + f["per_row"] * f["acc"]  # w[y] of each row, by each of its threads
    else:
        assert read(buffers, "target") == f["rows"] * f["K"] * f["target_elem"], f"target reads {buffers}"
        weight_floor = weight_bound = f["rows"] * f["K"] * f["acc"]
    if case.weight:
        assert weight_floor <= read(buffers, "weight") <= weight_bound, f"weight reads {buffers}"


@pytest.fixture(scope="module")
def counted_driver():
    return emulation.build_driver("counted")


def run_counted(driver, case, gen, mapping):
    inputs = emulation.make_inputs(case, gen)
    result = emulation.run(driver, case, inputs)
    emulation.check(case, inputs, result)
    return floors(case, inputs, mapping), result.traffic


INDEX_VARIANTS = {
    "plain": dict(ignore="some", eps=0.1, reduction="none"),
    "weights": dict(ignore="some", weight=True, eps=0.1, reduction="mean"),
    "weights_no_smoothing": dict(ignore="class", weight=True, eps=0.0, reduction="sum"),
    "options": dict(ignore="some", weight=True, eps=0.1, reduction="mean", smoothing="others", softcap=3.0,
                    grad_lse=True),
}
# The options on top of probability targets with class weights (where the targets and weights cost the most).
PROBABILITY_VARIANTS = {
    "plain": dict(),
    "options": dict(softcap=3.0, grad_lse=True),
}


@pytest.mark.parametrize("variant", tuple(INDEX_VARIANTS))
@pytest.mark.parametrize("mapping", tuple(THREADS_PER_ROW))
def test_class_index_traffic_is_at_the_floor(mapping, variant, counted_driver, gen):
    case = mapping_case(mapping, target="index", **INDEX_VARIANTS[variant])
    f, traffic = run_counted(counted_driver, case, gen, mapping)
    forward, small_forward = split_traffic(traffic, "forward")
    backward, small_backward = split_traffic(traffic, "backward")
    check_forward(case, f, forward)
    check_backward(case, f, backward)
    check_small_kernels(small_forward + small_backward, f)


@pytest.mark.parametrize("variant", tuple(PROBABILITY_VARIANTS))
@pytest.mark.parametrize("mapping", tuple(THREADS_PER_ROW))
def test_probability_forward_traffic_is_at_the_floor(mapping, variant, counted_driver, gen):
    case = mapping_case(mapping, target="probability", weight=True, eps=0.1, reduction="mean", backward=False,
                        **PROBABILITY_VARIANTS[variant])
    f, traffic = run_counted(counted_driver, case, gen, mapping)
    forward, small = split_traffic(traffic, "forward")
    check_forward(case, f, forward)
    check_small_kernels(small, f)


@pytest.mark.parametrize("variant", tuple(PROBABILITY_VARIANTS))
@pytest.mark.parametrize("mapping", tuple(THREADS_PER_ROW))
def test_probability_backward_traffic_is_at_the_floor(mapping, variant, counted_driver, gen):
    case = mapping_case(mapping, target="probability", weight=True, eps=0.1, reduction="sum",
                        **PROBABILITY_VARIANTS[variant])
    f, traffic = run_counted(counted_driver, case, gen, mapping)
    backward, small = split_traffic(traffic, "backward")
    check_small_kernels(small, f)
    check_backward(case, f, backward)
