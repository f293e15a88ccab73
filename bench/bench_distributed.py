"""Benchmark the vocabulary-parallel loss (labelsmooth_ext.distributed) on CPU ranks over gloo.

Two things, in one run:

* Bytes each rank sends per row, for the collectives ours issues (counted by a wrapper around them during the
  timed run) and for the peers' published algorithms: Megatron-LM's VocabParallelCrossEntropy (all-reduces of
  the row max, the target logit and the sum of exponentials: 3 fp32 per row) and torch's loss_parallel (the
  same three all-reduces: max and sum-exp in its log_softmax, the target's log-probability in nll_loss).
  Collectives are taken as ring algorithms (what NCCL and gloo run for large payloads): an all-reduce of n
  bytes sends 2 (P - 1) / P * n per rank, an all-gather of n bytes per rank sends (P - 1) * n.
* Forward+backward time with P ranks (default 2) of ours against gathering the logits and calling
  labelsmooth_ext.cross_entropy on the whole (N, K), and, at label_smoothing 0 (it supports no smoothing),
  torch's loss_parallel on DTensor logits against ours at 0.

With --record (or --results) one CSV row per (shape, dtype, implementation) goes to bench/results_distributed.csv.
See bench/README.md.
"""

import argparse
import csv
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import labelsmooth_ext
from labelsmooth_ext import distributed

from bench_cross_entropy import DTYPES, IGNORE_INDEX, make_inputs, parse_dtypes, parse_shapes, run_context

DEFAULT_SHAPES = "2048x32000,512x128256"
QUICK_SHAPES = "256x1000,64x32000"
DEFAULT_REPEATS = 10
QUICK_REPEATS = 3
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results_distributed.csv"
CSV_COLUMNS = ["date", "machine", "torch", "labelsmooth_ext", "backend", "ranks", "threads_per_rank", "dtype", "N",
               "K", "label_smoothing", "impl", "median_ms", "sent_bytes_per_row", "collectives_per_step"]
# Peers' per-row all-reduce payloads (fp32: both upcast the logits' partials), from their published code.
PEER_ALL_REDUCE_BYTES_PER_ROW = {"megatron": 3 * 4, "torch loss_parallel": 3 * 4}
PEER_COLLECTIVES = {"megatron": 3, "torch loss_parallel": 3}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="processes (gloo, CPU)")
    parser.add_argument("--dtypes", type=parse_dtypes, default="fp32,bf16", help=f"from {','.join(DTYPES)}")
    parser.add_argument("--shapes", type=parse_shapes, help=f"comma-separated NxK (default {DEFAULT_SHAPES}); K "
                                                            "must divide evenly by --ranks")
    parser.add_argument("--repeats", type=int, help=f"timed repeats (default {DEFAULT_REPEATS})")
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, {QUICK_REPEATS} repeats")
    parser.add_argument("--eps", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--record", action="store_true", help=f"append to {DEFAULT_RESULTS.name}")
    parser.add_argument("--results", type=Path, help="append to this CSV instead")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if args.record and args.results is None:
        args.results = DEFAULT_RESULTS
    for n, k in args.shapes:
        if k % args.ranks:
            parser.error(f"K={k} does not divide evenly by --ranks {args.ranks} (the gathered baseline needs equal "
                         "shards)")
    return args


def ring_sent_bytes(kind, payload, ranks):
    """Bytes one rank sends in a ring all-gather (payload per rank) or all-reduce (payload = the whole)."""
    return (ranks - 1) * payload if kind == "all_gather" else 2 * (ranks - 1) / ranks * payload


class CountingAllGather:
    """Wraps the all-gather that labelsmooth_ext.distributed issues and records each call's payload."""

    def __init__(self, inner):
        self.inner, self.payloads = inner, []

    def __call__(self, out, tensor, group=None):
        self.payloads.append(tensor.numel() * tensor.element_size())
        return self.inner(out, tensor, group=group)


def ours_step(local, target, eps):
    x = local.detach().requires_grad_()
    loss = distributed.vocab_parallel_cross_entropy(x, target, ignore_index=IGNORE_INDEX, label_smoothing=eps)
    loss.backward()
    return loss.detach()


def gathered_step(local, target, eps):
    """The logits gathered on every rank, the loss of the whole, this rank's slice of the gradient."""
    ranks, rank = dist.get_world_size(), dist.get_rank()
    gathered = distributed.all_gather(local.detach(), None)
    full = gathered.permute(1, 0, 2).reshape(local.shape[0], -1).requires_grad_()
    loss = labelsmooth_ext.cross_entropy(full, target, ignore_index=IGNORE_INDEX, label_smoothing=eps)
    loss.backward()
    width = full.shape[1] // ranks
    full.grad[:, rank * width:(rank + 1) * width].contiguous()
    return loss.detach()


def loss_parallel_step(mesh, local, target):
    from torch.distributed.tensor import Shard, DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    x = DTensor.from_local(local.detach(), mesh, [Shard(1)]).requires_grad_()
    with loss_parallel():
        loss = F.cross_entropy(x, target, ignore_index=IGNORE_INDEX)
        loss.backward()
    return loss.to_local().detach()


def median_ms(runners, repeats):
    """Every runner once per repeat (interleaved, so load changes hit all alike), after a barrier."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def worker(rank, ranks, store_path, args, out_path):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    dist.init_process_group("gloo", store=dist.FileStore(store_path, ranks), rank=rank, world_size=ranks)
    counter = CountingAllGather(distributed._all_gather_single)
    distributed._all_gather_single = counter
    mesh = init_device_mesh("cpu", (ranks,))
    results = []
    for n, k in args.shapes:
        for dtype_name in args.dtypes:
            logits, target = make_inputs(n, k, DTYPES[dtype_name], "cpu")  # seeded: the same on every rank
            width = k // ranks
            local = logits.detach()[:, rank * width:(rank + 1) * width].contiguous()
            counter.payloads.clear()
            ours = ours_step(local, target, args.eps)
            ours_payloads = list(counter.payloads)
            counter.payloads.clear()
            gathered = gathered_step(local, target, args.eps)
            gathered_payloads = list(counter.payloads)
            if not torch.allclose(ours.double(), gathered.double(), rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{dtype_name} {n}x{k}: ours {ours.item()} != gathered {gathered.item()}")
            runners = {
                "ours": functools.partial(ours_step, local, target, args.eps),
                "gathered logits + cross_entropy": functools.partial(gathered_step, local, target, args.eps),
                "ours (eps=0)": functools.partial(ours_step, local, target, 0.0),
                "torch loss_parallel (eps=0)": functools.partial(loss_parallel_step, mesh, local, target),
            }
            medians = median_ms(runners, args.repeats)
            results.append({"N": n, "K": k, "dtype": dtype_name, "medians": medians,
                            "payloads": {"ours": ours_payloads, "gathered logits + cross_entropy": gathered_payloads}})
    dist.destroy_process_group()
    if rank == 0:
        torch.save({"results": results, "threads": torch.get_num_threads()}, out_path)


def sent_per_row(impl, payloads, rows, ranks):
    """(bytes one rank sends per row, collectives per step) of an implementation."""
    impl = impl.replace(" (eps=0)", "")
    if impl in payloads:
        return sum(ring_sent_bytes("all_gather", p, ranks) for p in payloads[impl]) / rows, len(payloads[impl])
    return ring_sent_bytes("all_reduce", PEER_ALL_REDUCE_BYTES_PER_ROW[impl], ranks), PEER_COLLECTIVES[impl]


def print_bytes_table(result):
    """Bytes per row for several group sizes: ours' payloads are counted (they do not depend on the group
    size), the peers' computed from their algorithms."""
    rows, payloads = result["N"], result["payloads"]
    impls = ["ours", "megatron", "torch loss_parallel", "gathered logits + cross_entropy"]
    print(f"  bytes sent per rank per row ({result['dtype']}, N={rows}, K={result['K']}; ring collectives):")
    print(f"    {'':<34}" + "".join(f"{f'P={p}':>12}" for p in (2, 4, 8)) + f"{'collectives':>13}")
    for impl in impls:
        figures = [sent_per_row(impl, payloads, rows, p) for p in (2, 4, 8)]
        print(f"    {impl:<34}" + "".join(f"{b:>12.2f}" for b, _ in figures) + f"{figures[0][1]:>13}")


def main(argv=None):
    args = parse_args(argv)
    info = labelsmooth_ext.backend_info()
    context = run_context("cpu", info)
    with tempfile.TemporaryDirectory() as scratch:
        out_path = os.path.join(scratch, "results.pt")
        mp.spawn(worker, args=(args.ranks, os.path.join(scratch, "store"), args, out_path), nprocs=args.ranks,
                 join=True)
        run = torch.load(out_path, weights_only=False)
    print(f"{context['machine']} | torch {context['torch']} | labelsmooth_ext {context['labelsmooth_ext']} "
          f"({context['backend']}) | {args.ranks} ranks x {run['threads']} threads, gloo")
    print(f"label_smoothing={args.eps}, reduction=mean, every 50th row ignored; median of {args.repeats} repeats "
          "of forward+backward (rank 0's clock; every step synchronises the ranks)")
    csv_rows = []
    for result in run["results"]:
        print(f"{result['dtype']} N={result['N']} K={result['K']}")
        medians = result["medians"]
        for impl, ms in medians.items():
            sent, collectives = sent_per_row(impl, result["payloads"], result["N"], args.ranks)
            reference = medians["ours (eps=0)" if "eps=0" in impl else "ours"]
            print(f"  {impl:<34} {ms:>10.2f} ms  {ms / reference:>6.2f}x ours  {sent:>12.2f} B/row sent")
            csv_rows.append({**context, "ranks": args.ranks, "threads_per_rank": run["threads"],
                             "dtype": result["dtype"], "N": result["N"], "K": result["K"],
                             "label_smoothing": 0.0 if "eps=0" in impl else args.eps, "impl": impl,
                             "median_ms": f"{ms:.4f}", "sent_bytes_per_row": f"{sent:.3f}",
                             "collectives_per_step": collectives})
        print_bytes_table(result)
    if args.results:
        new = not args.results.exists()
        with open(args.results, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(csv_rows)
    print(f"appended to {args.results}" if args.results else f"not recorded (--record appends to "
                                                             f"bench/{DEFAULT_RESULTS.name})")


if __name__ == "__main__":
    sys.exit(main())
