"""The correctness matrix: loss, lse and gradient against float64 F.cross_entropy over dtypes x
reductions x weights x ignore_index x label smoothing x shapes x memory layouts x class counts x
target kinds, for three implementations: the compiled op (when it is the active backend), the
pure-PyTorch reference functions, and the public API under autograd.

Coverage. The full product (4*3*2*4*3*4*5*7*4 = 1.6M cases) is far too big, so the cases are:
  1. a covering array of strength 2: every pair of values of any two factors appears in at least one
     case (built greedily below from a fixed seed; test_every_pair_is_covered checks it, so a factor
     added later cannot silently lose coverage);
  2. EXTRA_RANDOM_CASES more cases drawn uniformly from the valid product (fixed seed), which cover a
     good share of the value triples as well;
  3. the full product of the numerical core (dtype x reduction x weight x eps x target kind) in
     test_numerical_core_full_product.
Every implementation runs every case. The data itself is fresh on every run (see conftest).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import labelsmooth_ext
from labelsmooth_ext import reference

from conftest import (
    REDUCTION_CODES,
    accumulation_dtype,
    assert_within,
    class_dim_of,
    class_weight,
    compiled_available,
    grad_output_like,
    grad_tolerance,
    loss_tolerance,
    lse_tolerance,
    op_backward,
    op_forward,
    probability_target,
    randn,
    reference_loss_and_grads,
    with_layout,
)

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}

FACTORS = {
    "dtype": tuple(DTYPES),
    "reduction": ("none", "mean", "sum"),
    "weight": ("none", "random"),
    "ignore": ("none", "some", "all", "class"),  # 'class': ignore_index is a real class
    "eps": (0.0, 0.05, 1.0),
    "shape": ("C", "NC", "NCd", "NCdd"),
    "layout": ("contiguous", "sliced", "permuted", "class_last", "broadcast"),
    "K": (1, 2, 5, 31, 128, 1000, 4099),
    "target": ("int64", "int32", "uint8", "prob"),
}
FACTOR_NAMES = tuple(FACTORS)
EXTRA_RANDOM_CASES = 120
DESIGN_SEED = 20250607

# A uint8 target cannot hold -100: its ignore_index is 255, so it needs K < 255 to stay a non-class.
IGNORE_INDEX_OF_DTYPE = {"int64": -100, "int32": -1, "uint8": 255, "prob": -100}


def _allowed(case: dict) -> bool:
    """Constraints between factor values; also applied to partial assignments while building."""
    def has(name, *values):
        return name in case and case[name] in values

    if has("target", "prob") and "ignore" in case and case["ignore"] != "none":
        return False  # ignore_index >= 0 is an error with probability targets (tested in test_errors)
    if has("target", "uint8") and "K" in case and case["K"] > 254:
        return False
    if has("shape", "C") and (has("ignore", "some") or has("layout", "permuted", "class_last", "broadcast")):
        return False  # one row, and a 1-D tensor has no other dim to permute or broadcast
    if has("layout", "class_last") and has("shape", "NC"):
        return False  # (N, C) is already class-last: 'permuted' covers its transposed form
    return True


def _pairs_of(case: dict):
    for a, b in itertools.combinations(FACTOR_NAMES, 2):
        yield (a, case[a], b, case[b])


def _all_valid_pairs() -> set:
    pairs = set()
    for a, b in itertools.combinations(FACTOR_NAMES, 2):
        for va in FACTORS[a]:
            for vb in FACTORS[b]:
                if _allowed({a: va, b: vb}):
                    pairs.add((a, va, b, vb))
    return pairs


def _greedy_pairwise(rng: random.Random) -> list[dict]:
    """AETG-style greedy covering array: each new case starts from an uncovered pair and fills the
    other factors (in random order) with the value covering the most uncovered pairs."""
    uncovered = _all_valid_pairs()
    cases = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(12):
            a, va, b, vb = rng.choice(sorted(uncovered, key=repr))
            case = {a: va, b: vb}
            rest = [n for n in FACTOR_NAMES if n not in case]
            rng.shuffle(rest)
            for name in rest:
                options = [v for v in FACTORS[name] if _allowed({**case, name: v})]
                rng.shuffle(options)

                def gain(v):
                    return sum((m, case[m], name, v) in uncovered or (name, v, m, case[m]) in uncovered
                               for m in case)

                case[name] = max(options, key=gain)
            ordered = {n: case[n] for n in FACTOR_NAMES}
            case_gain = len(uncovered.intersection(_pairs_of(ordered)))
            if case_gain > best_gain:
                best, best_gain = ordered, case_gain
        cases.append(best)
        uncovered.difference_update(_pairs_of(best))
    return cases


def _random_cases(rng: random.Random, count: int) -> list[dict]:
    cases = []
    while len(cases) < count:
        case = {n: rng.choice(FACTORS[n]) for n in FACTOR_NAMES}
        if _allowed(case):
            cases.append(case)
    return cases


def _design() -> list[dict]:
    rng = random.Random(DESIGN_SEED)
    return _greedy_pairwise(rng) + _random_cases(rng, EXTRA_RANDOM_CASES)


CASES = _design()


def _case_id(case: dict) -> str:
    return "-".join(f"{case[n]}" if n != "K" else f"K{case[n]}" for n in FACTOR_NAMES)


def test_every_pair_is_covered():
    covered = set()
    for case in CASES:
        assert _allowed(case), case
        covered.update(_pairs_of(case))
    missing = _all_valid_pairs() - covered
    assert not missing, f"pairs not covered by the design: {sorted(missing, key=repr)[:10]}"


# ----------------------------------------------------------------------------------------------------
# Building one case's inputs


def _row_dims(shape_kind: str, num_classes: int, need_two_rows: bool, gen) -> list[int]:
    """Random extents for the non-class dims, at most ~30k logits in all."""
    budget = max(2, min(48, 30000 // num_classes))

    def extent(limit):
        return int(torch.randint(1, max(limit, 1) + 1, (), generator=gen))

    if shape_kind == "C":
        return []
    if shape_kind == "NC":
        dims = [extent(budget)]
    elif shape_kind == "NCd":
        dims = [extent(3), extent(max(1, budget // 3))]
    else:
        dims = [extent(2), extent(3), extent(max(1, budget // 6))]
    if need_two_rows and dims[-1] < 2:
        dims[-1] = 2
    return dims


def _class_target(row_shape, num_classes, target_kind, ignore, ignore_index, gen) -> torch.Tensor:
    dtype = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[target_kind]
    target = torch.randint(0, num_classes, row_shape, generator=gen)
    flat = target.view(-1)
    if ignore == "some":
        mask = torch.rand(flat.shape, generator=gen) < 0.35
        mask[0], mask[-1] = True, False  # at least one ignored row and one used row
        flat[mask] = ignore_index
    elif ignore == "all":
        flat.fill_(ignore_index)
    elif ignore == "class":
        flat[0] = ignore_index  # some rows hit the ignored class ...
        if flat.numel() > 1 and num_classes > 1:
            flat[-1] = (ignore_index + 1) % num_classes  # ... and some do not
    return target.to(dtype)


def _class_target_layout(target: torch.Tensor, layout: str) -> torch.Tensor:
    """Class-index targets with strides too: every other element of a longer tensor, or stored in
    reversed dim order."""
    if target.dim() == 0 or layout in ("contiguous", "class_last", "broadcast"):
        return target
    if layout == "sliced":
        wide = torch.zeros((2 * target.shape[0],) + tuple(target.shape[1:]), dtype=target.dtype)
        wide[::2] = target
        return wide[::2]
    order = list(reversed(range(target.dim())))
    return target.permute(order).contiguous().permute(order)


def build_case(case: dict, gen):
    """(input, target, weight, ignore_index, reduction, eps, upstream gradient)."""
    dtype = DTYPES[case["dtype"]]
    num_classes = case["K"]
    probability = case["target"] == "prob"
    dims = _row_dims(case["shape"], num_classes, case["ignore"] == "some", gen)
    shape = [num_classes] if not dims else [dims[0], num_classes] + dims[1:]
    class_dim = 0 if len(shape) == 1 else 1
    scale = 1.0 + 3.0 * float(torch.rand((), generator=gen))
    logits = with_layout(randn(shape, gen, dtype, scale), class_dim, case["layout"], gen)

    if case["ignore"] == "class":
        ignore_index = min(2, num_classes - 1)
    else:
        ignore_index = IGNORE_INDEX_OF_DTYPE[case["target"]]
    if probability:
        normalized = bool(torch.rand((), generator=gen) < 0.5)
        target = probability_target(shape, class_dim, gen, dtype, normalized)
        target = with_layout(target, class_dim, "contiguous" if case["layout"] == "broadcast" else case["layout"], gen)
    else:
        row_shape = [d for i, d in enumerate(shape) if i != class_dim]
        target = _class_target(row_shape, num_classes, case["target"], case["ignore"], ignore_index, gen)
        target = _class_target_layout(target, case["layout"])
    weight = class_weight(num_classes, gen, dtype) if case["weight"] == "random" else None
    loss_shape = target.shape[:class_dim] + target.shape[class_dim + 1:] if probability else target.shape
    grad_output = grad_output_like(loss_shape if case["reduction"] == "none" else (), gen)
    return logits, target, weight, ignore_index, case["reduction"], case["eps"], grad_output


# ----------------------------------------------------------------------------------------------------
# Running one case through one implementation


def _run_op(forward, backward, inputs):
    logits, target, weight, ignore_index, reduction, eps, grad_output = inputs
    code = REDUCTION_CODES[reduction]
    loss, lse, mass = forward(logits, target, weight, ignore_index, eps, 0, None, code)
    grad = backward(grad_output.to(loss.dtype), None, logits, target, weight, lse, mass, ignore_index, eps, 0, None, code)
    assert grad.is_contiguous(), "grad_input must be contiguous"
    return loss, lse, grad


def _run_api(inputs):
    logits, target, weight, ignore_index, reduction, eps, grad_output = inputs
    x = logits.detach().requires_grad_()
    loss = labelsmooth_ext.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(loss.dtype))
    return loss, None, grad


IMPLS = ("compiled_op", "reference", "api")


def run_impl(impl: str, inputs):
    if impl == "compiled_op":
        if not compiled_available():
            pytest.skip("compiled backend not active")
        return _run_op(op_forward(), op_backward(), inputs)
    if impl == "reference":
        return _run_op(reference.ls_cross_entropy_forward, reference.ls_cross_entropy_backward, inputs)
    return _run_api(inputs)


def check_against_float64(impl: str, inputs):
    logits, target, weight, ignore_index, reduction, eps, grad_output = inputs
    loss, lse, grad = run_impl(impl, inputs)
    ref_loss, ref_grad, _ = reference_loss_and_grads(logits, target, weight, ignore_index, reduction, eps,
                                                      grad_output)

    acc = accumulation_dtype(logits.dtype)
    assert loss.dtype == acc, f"loss dtype {loss.dtype}, expected {acc}"
    assert grad.dtype == logits.dtype and grad.shape == logits.shape, (grad.dtype, grad.shape)
    assert_within(loss, ref_loss, loss_tolerance(logits, target, weight, ignore_index, reduction, eps), "loss")
    tol = grad_tolerance(logits, target, weight, ignore_index, reduction, eps, grad_output, ref_grad)
    assert_within(grad, ref_grad, tol, "grad_input")

    if lse is not None:
        class_dim = class_dim_of(logits)
        assert lse.dtype == acc
        ref_lse = torch.logsumexp(logits.to(torch.float64), dim=class_dim)
        if not (target.shape == logits.shape and target.is_floating_point()):
            ignored = target.to(torch.int64) == ignore_index
            assert bool((lse[ignored] == 0).all()), "lse of ignored rows must be 0"
            ref_lse = torch.where(ignored, torch.zeros_like(ref_lse), ref_lse)
        assert_within(lse, ref_lse, lse_tolerance(logits), "lse")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matrix(impl, case, gen):
    check_against_float64(impl, build_case(case, gen))


CORE_CASES = [
    {"dtype": d, "reduction": r, "weight": w, "eps": e, "target": t, "ignore": i, "K": k, "shape": s, "layout": "contiguous"}
    for d in DTYPES
    for r in FACTORS["reduction"]
    for w in FACTORS["weight"]
    for e in FACTORS["eps"]
    for t, i, k, s in (("int64", "some", 37, "NC"), ("prob", "none", 19, "NCd"))
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CORE_CASES, ids=[_case_id(c) for c in CORE_CASES])
def test_numerical_core_full_product(impl, case, gen):
    check_against_float64(impl, build_case(case, gen))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_classes", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 1023, 1025])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_simd_tail(impl, num_classes, dtype, gen):
    """K around multiples of the SIMD widths (8/16/32 lanes): the vector body and the scalar tail."""
    case = {"dtype": dtype, "reduction": "none", "weight": "random", "eps": 0.1, "target": "int64",
            "ignore": "some", "K": num_classes, "shape": "NC", "layout": "sliced"}
    check_against_float64(impl, build_case(case, gen))
