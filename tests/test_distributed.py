"""labelsmooth_ext.distributed: the vocabulary-parallel loss on spawned gloo process groups of 2 and 3 ranks.

One spawn per group size runs every case (process start-up dominates the time); each rank sends back its
loss, its gradient slice and the errors it raised, and the parent checks them against float64 compositions of
plain PyTorch ops on the gathered logits (tests/test_options.py's composed_loss), and that every rank holds
the same bits. Shards are uneven, one holds a single class (no target of the batch falls in it in some cases),
and in some cases the shards are not in rank order.

Tolerances: conftest.py's for the loss and gradient of the gathered (capped) logits, plus what the merge adds:
each row's two nonnegative terms pass through a fixed number of roundings per rank (the merge sums one gap and
one partial per rank, and the lse merge rounds an exp and a log per rank), so their error is
u * (4 * ranks + 16) times the terms' magnitude. In the gradient the target element is rounded twice (the op's
value in the logits' dtype, then after the target term is subtracted), one more u_in of the row's scale.
"""

from __future__ import annotations

import math
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import labelsmooth_ext
from labelsmooth_ext import reference
from labelsmooth_ext.distributed import vocab_parallel_cross_entropy

from conftest import (
    RUN_SEED,
    accumulation_dtype,
    assert_within,
    class_weight,
    grad_tolerance,
    loss_tolerance,
    smoothed_coefficients,
    unit_roundoff,
    upstream_per_row,
)
from test_options import _aggregate, _z_loss_tolerance, composed_loss, composed_row_weights

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# Shard sizes per group: uneven, with a one-class shard.
SHARDS = {2: (7, 12), 3: (6, 1, 9)}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _cases(sizes):
    """A covering set: every reduction x eps x weights x ignore kind, dtypes and options spread over them."""
    cases = []
    options_cycle = [{}, {"z_loss": 1e-2}, {"softcap": 2.5}, {"smoothing": "others"},
                     {"z_loss": 3e-3, "softcap": 4.0, "smoothing": "others"}]
    index = 0
    for reduction in ("none", "mean", "sum"):
        for eps in (0.0, 0.1):
            for weighted in (False, True):
                for ignore in ("none", "some", "real_class"):
                    options = dict(options_cycle[index % len(options_cycle)])
                    if reduction == "mean" and index % 4 == 0:
                        options["normalizer"] = 9.5
                    cases.append({"sizes": sizes, "dtype": DTYPES[index % len(DTYPES)], "reduction": reduction,
                                  "eps": eps, "weighted": weighted, "ignore": ignore, "rows": 11 + index % 5,
                                  "vocab_start": ("given" if index % 3 == 1 else "derived"), "options": options,
                                  "avoid_smallest_shard": index % 2 == 0})
                    index += 1
    cases.append({"sizes": sizes, "dtype": torch.float32, "reduction": "mean", "eps": 0.1, "weighted": True,
                  "ignore": "all", "rows": 5, "vocab_start": "derived", "options": {}, "avoid_smallest_shard": False})
    return cases


def _build(case, gen):
    """Full logits (N, K), target, full weight, ignore_index and upstream gradient, from the test's generator."""
    num_classes = sum(case["sizes"])
    rows = case["rows"]
    logits = (torch.randn(rows, num_classes, generator=gen, dtype=torch.float64) * 3.0).to(case["dtype"])
    target = torch.randint(0, num_classes, (rows,), generator=gen)
    if case["avoid_smallest_shard"]:  # a rank whose shard holds no target of the batch
        smallest = min(range(len(case["sizes"])), key=lambda r: case["sizes"][r])
        start = sum(case["sizes"][:smallest])
        in_it = (target >= start) & (target < start + case["sizes"][smallest])
        target = torch.where(in_it, (target + case["sizes"][smallest]) % num_classes, target)
    ignore_index = -100
    if case["ignore"] == "some":
        target[torch.rand(rows, generator=gen) < 0.3] = ignore_index
    elif case["ignore"] == "real_class":  # an ignore_index that is a real class: its rows are ignored
        ignore_index = int(target[0])
    elif case["ignore"] == "all":
        target.fill_(ignore_index)
    weight = class_weight(num_classes, gen, torch.float32) if case["weighted"] else None
    shape = (rows,) if case["reduction"] == "none" else ()
    upstream = (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)) * \
        torch.where(torch.rand(shape, generator=gen) < 0.3, -1.0, 1.0)
    return logits, target, weight, ignore_index, upstream


def _shard_starts(sizes, permuted):
    """Rank order, or the shards laid out in reverse rank order (rank 0 holds the last classes)."""
    order = list(reversed(range(len(sizes)))) if permuted else list(range(len(sizes)))
    starts, offset = [0] * len(sizes), 0
    for rank in order:
        starts[rank] = offset
        offset += sizes[rank]
    return starts


def _run_case(rank, case, data):
    logits, target, weight, ignore_index, upstream = data
    permuted = case["vocab_start"] == "given"
    start = _shard_starts(case["sizes"], permuted)[rank]
    size = case["sizes"][rank]
    local = logits[:, start:start + size].clone().requires_grad_()
    local_weight = None if weight is None else weight[start:start + size]
    loss = vocab_parallel_cross_entropy(
        local, target, vocab_start=start if permuted else None, weight=local_weight, ignore_index=ignore_index,
        reduction=case["reduction"], label_smoothing=case["eps"], **case["options"])
    loss.backward(upstream.to(loss.dtype))
    return {"loss": loss.detach(), "grad": local.grad, "start": start}


def _run_dtensor_case(rank, world, data):
    """cross_entropy on Shard(1) DTensor logits (torch.chunk's uneven split), label smoothing and weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    logits, target, weight, ignore_index, upstream = data
    mesh = init_device_mesh("cpu", (world,))
    sharded = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    loss = labelsmooth_ext.cross_entropy(sharded, target, weight, ignore_index=ignore_index, label_smoothing=0.1)
    placements = tuple(loss.placements)
    loss.backward(DTensor.from_local(upstream.to(loss.dtype), mesh, [Replicate()]))
    return {"loss": loss.to_local().detach(), "grad": sharded.grad.full_tensor(),
            "replicated": placements == (Replicate(),)}


def _errors(rank, world, sizes):
    """(name, exception type, message) of calls that must fail alike on every rank."""
    torch.manual_seed(0)  # identical data on every rank
    rows = 4
    target = torch.zeros(rows, dtype=torch.int64)
    local = torch.randn(rows, sizes[rank])
    calls = {
        "vocab_start_gap": lambda: vocab_parallel_cross_entropy(local, target, vocab_start=rank * (sizes[0] + 1)),
        "vocab_start_some_ranks": lambda: vocab_parallel_cross_entropy(
            local, target, vocab_start=0 if rank == 0 else None),
        "target_out_of_range": lambda: vocab_parallel_cross_entropy(local, torch.full((rows,), sum(sizes))),
        "rows_differ": lambda: vocab_parallel_cross_entropy(local[: rows - rank], target[: rows - rank]),
        "weight_length": lambda: vocab_parallel_cross_entropy(local, target, weight=torch.ones(sizes[rank] + 1)),
        "target_shape": lambda: vocab_parallel_cross_entropy(local, target.view(2, 2)),
        "weight_requires_grad": lambda: vocab_parallel_cross_entropy(
            local, target, weight=torch.ones(sizes[rank], requires_grad=True)),
        "empty_shard": lambda: vocab_parallel_cross_entropy(local[:, : 0 if rank == world - 1 else None], target),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as error:  # noqa: BLE001 (the parent checks type and message)
            out[name] = (type(error).__name__, str(error))
    return out


def _worker(rank, world, store_path, cases, data, dtensor_data, out_dir):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    # A bounded timeout: a rank that fails leaves the others waiting in a collective for this long, not 30 min.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = {"cases": [_run_case(rank, case, d) for case, d in zip(cases, data)],
                   "dtensor": _run_dtensor_case(rank, world, dtensor_data),
                   "errors": _errors(rank, world, SHARDS[world])}
        # Every rank past its last collective before any leaves.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # The results are saved; leave without the interpreter's teardown. gloo's threads, torn down at exit,
    # occasionally abort a rank under load ("terminate called without an active exception"), which says
    # nothing about the loss and would fail the run after every check passed.
    os._exit(0)


def _spawn(world, cases, data, dtensor_data):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, os.path.join(out_dir, "store"), cases, data, dtensor_data, out_dir),
                 nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=sorted(SHARDS), ids=lambda w: f"{w}ranks")
def group_run(request):
    """Every case of one group size, run once on spawned ranks: (cases, their data, the ranks' results)."""
    world = request.param
    gen = torch.Generator().manual_seed(RUN_SEED ^ (world << 20))
    cases = _cases(SHARDS[world])
    data = [_build(case, gen) for case in cases]
    dtensor_case = {"sizes": (11, 11, 9)[:world] if world == 3 else (16, 15), "dtype": torch.float32,
                    "reduction": "mean", "eps": 0.1, "weighted": True, "ignore": "some", "rows": 13,
                    "avoid_smallest_shard": False}
    dtensor_data = _build(dtensor_case, gen)
    return world, cases, data, dtensor_data, _spawn(world, cases, data, dtensor_data)


def _reference(case, data):
    """float64 loss and gradient of the gathered logits, and their tolerances."""
    logits, target, weight, ignore_index, upstream = data
    options = case["options"]
    z_loss, softcap = options.get("z_loss", 0.0), options.get("softcap")
    smoothing, normalizer = options.get("smoothing", "uniform"), options.get("normalizer")
    reduction, eps = case["reduction"], case["eps"]
    x64 = logits.double().requires_grad_()
    w64 = None if weight is None else weight.double()
    loss, lse = composed_loss(x64, target, w64, ignore_index, reduction, eps, z_loss=z_loss, softcap=softcap,
                              smoothing=smoothing, normalizer=normalizer)
    (grad,) = torch.autograd.grad(loss, x64, upstream)
    row_weights = composed_row_weights(target, weight, ignore_index, target.shape)
    if reduction == "mean" and normalizer is None and float(row_weights.sum()) == 0:
        grad = torch.zeros_like(grad)  # all rows ignored: NaN mean, zero gradient (as PyTorch)

    acc = accumulation_dtype(logits.dtype)
    u = unit_roundoff(acc)
    capped = logits if softcap is None else (softcap * torch.tanh(logits.double() / softcap)).to(logits.dtype)
    eps_u = reference.uniform_smoothing(eps, 1 if smoothing == "others" else 0, logits.shape[1])
    rows, _ = composed_loss(x64.detach(), target, w64, ignore_index, "none", eps, z_loss=z_loss, softcap=softcap,
                            smoothing=smoothing)
    row_tol = loss_tolerance(capped, target, weight, ignore_index, "none", eps_u)
    row_tol = row_tol + _z_loss_tolerance(logits, target, weight, ignore_index, "none", z_loss, lse.detach(), 1.0)
    row_tol = row_tol + _merge_tolerance(capped, target, weight, ignore_index, eps_u, len(case["sizes"]), u)
    denominator = normalizer if normalizer is not None else float(row_weights.sum())
    loss_tol = _aggregate(row_tol, rows, reduction, denominator, acc)

    red_for_tol = "sum" if normalizer is not None else reduction
    scale = upstream / (1.0 if normalizer is None else normalizer)
    grad_tol = grad_tolerance(capped, target, weight, ignore_index, red_for_tol, eps_u, scale, grad)
    # z-loss and softcap: the same slack as tests/test_options.py gives them.
    if z_loss:
        grad_tol = grad_tol + 64.0 * u * grad.abs().amax() + unit_roundoff(logits.dtype) * grad.abs()
    if softcap is not None:
        grad_tol = grad_tol + 8.0 * u * grad.abs() + unit_roundoff(logits.dtype) * grad.abs()
    grad_tol = grad_tol + _target_rounding(capped, target, weight, ignore_index, red_for_tol, eps_u, scale, z_loss,
                                           lse.detach())
    return loss.detach(), loss_tol, grad, grad_tol


def _merge_tolerance(capped, target, weight, ignore_index, eps, ranks, u):
    """u * (4 * ranks + 16) times the magnitude of the row's two terms, (1 - eps) w_y |lse - z_y| and
    (eps / K) sum_c w_c (|lse| + |z_c|) (see the module docstring)."""
    z = capped.double()
    num_classes = z.shape[1]
    lse = torch.logsumexp(z, dim=1)
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    t = target.to(torch.int64)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    target_part = (1.0 - eps) * w[safe] * (lse - z.gather(1, safe.unsqueeze(1)).squeeze(1)).abs()
    spread_part = (eps / num_classes) * (w * (lse.abs().unsqueeze(1) + z.abs())).sum(dim=1)
    return torch.where(valid, u * (4 * ranks + 16) * (target_part + spread_part), torch.zeros_like(lse))


def _target_rounding(logits, target, weight, ignore_index, reduction, eps, scale, z_loss, lse):
    """u_in times the op's value at each row's target element before the target term is subtracted: at most
    g * (mass + 2 z_loss w_y |lse|), mass = sum_c w_c q_c."""
    a = smoothed_coefficients(logits, target, weight, ignore_index, eps)
    g = upstream_per_row(logits, target, weight, ignore_index, reduction, scale).abs()
    t = target.to(torch.int64)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    w_y = composed_row_weights(target, weight, ignore_index, target.shape)
    bound = torch.where(valid, g * (a.sum(dim=1) + 2.0 * z_loss * w_y * lse.abs()), torch.zeros_like(g))
    extra = torch.zeros(logits.shape, dtype=torch.float64)
    return extra.scatter_(1, safe.unsqueeze(1), (unit_roundoff(logits.dtype) * bound).unsqueeze(1))


def _gathered_grad(results, case_index, sizes):
    """The ranks' gradient slices placed at their classes."""
    slices = [r["cases"][case_index] for r in results]
    order = sorted(range(len(slices)), key=lambda r: slices[r]["start"])
    return torch.cat([slices[r]["grad"] for r in order], dim=1)


def test_loss_and_gradient_against_float64(group_run):
    world, cases, data, _, results = group_run
    for index, (case, d) in enumerate(zip(cases, data)):
        what = f"{world} ranks, case {index} {case}"
        ref_loss, loss_tol, ref_grad, grad_tol = _reference(case, d)
        for rank in range(world):
            assert_within(results[rank]["cases"][index]["loss"], ref_loss, loss_tol, f"loss on rank {rank}, {what}")
        grad = _gathered_grad(results, index, case["sizes"])
        assert grad.dtype == case["dtype"]
        assert_within(grad, ref_grad, grad_tol, f"gradient, {what}")


def test_every_rank_holds_the_same_bits(group_run):
    world, cases, _, _, results = group_run
    for index in range(len(cases)):
        losses = [r["cases"][index]["loss"] for r in results]
        for rank in range(1, world):
            assert losses[rank].dtype == losses[0].dtype
            assert torch.equal(losses[rank].view(-1).view(torch.uint8), losses[0].view(-1).view(torch.uint8)), \
                f"case {index}: rank {rank}'s loss {losses[rank]} differs from rank 0's {losses[0]}"


def test_all_rows_ignored_mean_is_nan_with_zero_gradient(group_run):
    world, cases, _, _, results = group_run
    index = next(i for i, c in enumerate(cases) if c["ignore"] == "all")
    for rank in range(world):
        out = results[rank]["cases"][index]
        assert torch.isnan(out["loss"])
        assert torch.equal(out["grad"], torch.zeros_like(out["grad"]))


def test_dtensor_path(group_run):
    world, _, _, dtensor_data, results = group_run
    logits, target, weight, ignore_index, upstream = dtensor_data
    x64 = logits.double().requires_grad_()
    ref, _ = composed_loss(x64, target, weight.double(), ignore_index, "mean", 0.1)
    (ref_grad,) = torch.autograd.grad(ref, x64, upstream)
    tol = loss_tolerance(logits, target, weight, ignore_index, "mean", 0.1) * 4
    grad_tol = grad_tolerance(logits, target, weight, ignore_index, "mean", 0.1, upstream, ref_grad) * 4
    for rank in range(world):
        out = results[rank]["dtensor"]
        assert out["replicated"], "the loss must be a DTensor replicated on the mesh, as loss_parallel returns"
        assert_within(out["loss"], ref.detach(), tol, f"DTensor loss on rank {rank}")
        assert_within(out["grad"], ref_grad, grad_tol, f"DTensor gradient on rank {rank}")


ERRORS = {
    "vocab_start_gap": ("ValueError", r"vocab_start=.*cover the classes"),
    "vocab_start_some_ranks": ("ValueError", r"vocab_start must be given on every rank or on none"),
    "target_out_of_range": ("IndexError", r"Target \d+ is out of bounds \(expected a class index in \[0, \d+\)"),
    "rows_differ": ("ValueError", r"same rows .*got \[\d+, \d+"),
    "weight_length": ("ValueError", r"weight must be this rank's slice .*shape \[\d+\]"),
    "target_shape": ("ValueError", r"target must hold N global class indices, shape \(N\), got torch.int64 of shape "
                                   r"\[2, 2\]"),
    "weight_requires_grad": ("NotImplementedError", r"class weights are not differentiable"),
    "empty_shard": ("ValueError", r"rank \d+ holds no classes"),
}


def test_bad_calls_raise_clear_errors_on_every_rank(group_run):
    import re

    world, _, _, _, results = group_run
    for name, (kind, pattern) in ERRORS.items():
        for rank in range(world):
            got = results[rank]["errors"][name]
            assert got is not None, f"{name}: rank {rank} raised nothing"
            assert got[0] == kind and re.search(pattern, got[1]), f"{name} on rank {rank}: {got}"


def test_rank_local_parts_compile(gen):
    """The parts around the collective under torch.compile(fullgraph=True) match eager: the partials of a shard,
    and the merge of three ranks' partials (built eagerly here, no process group needed)."""
    from labelsmooth_ext import _distributed_local as local

    sizes, starts = [5, 9, 3], [0, 5, 14]
    rows = 12
    logits = torch.randn(rows, sum(sizes), generator=gen)
    target = torch.randint(0, sum(sizes), (rows,), generator=gen)
    target[1] = -100
    weight = class_weight(sum(sizes), gen, torch.float32)
    partials = torch.compile(local.local_partials, fullgraph=True)
    merge = torch.compile(local.merge, fullgraph=True)
    packed_eager, packed_compiled = [], []
    for start, size in zip(starts, sizes):
        args = (logits[:, start:start + size], target, weight[start:start + size], -100, start, 3.0)
        packed_eager.append(local.local_partials(*args)[0])
        packed_compiled.append(partials(*args)[0])
    u = unit_roundoff(torch.float32)
    for eager, compiled in zip(packed_eager, packed_compiled):
        assert_within(compiled, eager, 64 * u * (1.0 + eager.abs()), "compiled partials")
    gathered = torch.stack(packed_eager)
    merge_args = (gathered, target, -100, starts, sizes, True, 0.1, 1e-3, 1, None)
    eager_loss, _ = local.merge(*merge_args)
    compiled_loss, _ = merge(*merge_args)
    assert_within(compiled_loss, eager_loss, 64 * u * (1.0 + eager_loss.abs()), "compiled merge")
    assert math.isfinite(float(eager_loss))


def test_torchrun_example_runs():
    """The README's two-process example (it checks loss and gradient against the single-process loss itself)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "examples" / "vocab_parallel.py")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "same bits on every rank: True" in done.stdout, done.stdout
