"""Benchmark labelsmooth_ext.linear_cross_entropy (the fused linear head) against its peers: time and memory.

For each N x H x V shape and dtype, one forward+backward of the LLM head, loss(linear(x, W), t), with gradients
for x and W, by: ours fused; ours unfused (F.linear, then labelsmooth_ext.cross_entropy); torch's
F.linear_cross_entropy at the same eps (options=None: with label smoothing torch has no chunked path) and, for
reference, torch's chunked path (LinearCrossEntropyOptions()) with ours fused, both at eps = 0; and F.linear +
F.cross_entropy. Prints forward, backward and forward+backward medians and the peak extra memory of one step:
what it allocated beyond the inputs, the parameters and their gradients, also as a fraction of the logits'
size. With --record (or --results) appends one CSV row per (implementation, phase). See bench/README.md.
"""

import argparse
import csv
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import labelsmooth_ext

import bench_cross_entropy as common  # the clock, the medians, the CPU peak memory, the machine's description

IGNORE_INDEX = -100
IGNORED_ROW_STRIDE = 50  # every 50th row is ignored, as in bench_cross_entropy.py
WARMUP_STEPS = 1  # nothing here is compiled: one step to fault in memory and pick the GEMM kernels
DEFAULT_REPEATS = {"cpu": 3, "cuda": 20}
# The LLM heads of interest are N x H x V = 4096x2048x32000, 2048x4096x128256, 1024x2048x256000. A 2-core CPU
# takes minutes per step at those, so its default divides N by 4 and sets H to 64 (fewer GEMM flops; the loss's
# own cost, where fusion could lose time, weighs more): about a second per step in fp32. Smaller N means that the
# automatic chunks (at least 128 rows) hold a larger fraction of the logits; pass the full N with --shapes
# (4096x64x32000,2048x64x128256,1024x64x256000) to see the memory fractions of the full shapes.
DEFAULT_SHAPES = {
    "cpu": "1024x64x32000,512x64x128256,256x64x256000",
    "cuda": "4096x2048x32000,2048x4096x128256,1024x2048x256000",
}
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results_linear.csv"
PHASES = ("forward", "backward", "fwd+bwd")
# Relative agreement of each implementation's loss with F.linear + F.cross_entropy, checked before timing: the
# logits' GEMMs may be blocked differently (chunks), which moves a bf16 logit by up to one rounding.
LOSS_REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}
CSV_COLUMNS = [
    "date", "machine", "torch", "labelsmooth_ext", "backend", "device", "dtype", "N", "H", "V", "eps", "impl",
    "phase", "median_ms", "peak_extra_bytes", "logits_bytes", "ratio_vs_ours",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", type=common.parse_dtypes, default="fp32,bf16",
                        help=f"comma-separated, from {','.join(common.DTYPES)}")
    parser.add_argument("--shapes", type=parse_shapes, help="comma-separated NxHxV; default depends on --device")
    parser.add_argument("--repeats", type=int, help="timed repeats per case (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--eps", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--chunk-size", type=int, help="rows per chunk of ours fused (default: automatic)")
    parser.add_argument("--record", action="store_true",
                        help=f"append the results to {DEFAULT_RESULTS.name} next to this script")
    parser.add_argument("--results", type=Path, help="append the results to this CSV instead (implies recording)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.shapes = args.shapes or parse_shapes(DEFAULT_SHAPES[args.device])
    args.repeats = args.repeats or DEFAULT_REPEATS[args.device]
    if args.record and args.results is None:
        args.results = DEFAULT_RESULTS
    return args


def parse_shapes(text):
    return common.parse_sizes(text, "NxHxV")


def make_inputs(n, h, v, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, generator=generator, device=device).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=generator, device=device) / math.sqrt(h)).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    target[::IGNORED_ROW_STRIDE] = IGNORE_INDEX
    return x, w, target


def build_loss_fns(eps, chunk_size):
    """name -> (loss(x, W, t), eps it computes)."""
    def ours_fused(smoothing):
        return lambda x, w, t: labelsmooth_ext.linear_cross_entropy(x, w, t, label_smoothing=smoothing,
                                                                    chunk_size=chunk_size)

    def torch_lce(smoothing, options):
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, label_smoothing=smoothing, options=options)

    return {
        "ours_fused": (ours_fused(eps), eps),
        "ours_unfused": (lambda x, w, t: labelsmooth_ext.cross_entropy(F.linear(x, w), t, label_smoothing=eps), eps),
        "torch_lce": (torch_lce(eps, None), eps),
        "linear+F.ce": (lambda x, w, t: F.cross_entropy(F.linear(x, w), t, label_smoothing=eps), eps),
        "ours_fused_eps0": (ours_fused(0.0), 0.0),
        "torch_lce_chunked_eps0": (torch_lce(0.0, torch.nn.LinearCrossEntropyOptions()), 0.0),
    }


def check_loss_agreement(loss_fns, x, w, target):
    """Every implementation's loss against F.linear + F.cross_entropy at its eps, before anything is timed: ours
    must agree (an error otherwise); a peer that does not is timed all the same, with a note."""
    with torch.no_grad():
        for name, (fn, eps) in loss_fns.items():
            expected = F.cross_entropy(F.linear(x, w).float(), target, label_smoothing=eps).item()
            value = fn(x, w, target).float().item()
            if not math.isclose(value, expected, rel_tol=LOSS_REL_TOL[x.dtype]):
                message = f"{name}: loss {value:.7g} vs F.linear + F.cross_entropy {expected:.7g}"
                if name.startswith("ours"):
                    raise RuntimeError(message)
                print(f"  note: {message} (off by more than {LOSS_REL_TOL[x.dtype]:g} relative)")


def timed_step(fn, x, w, target, clock):
    mark, elapsed_ms = clock
    start = mark()
    loss = fn(x, w, target)
    middle = mark()
    torch.autograd.grad(loss, (x, w))
    end = mark()
    forward, backward = elapsed_ms(start, middle), elapsed_ms(middle, end)
    return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}


def training_step(fn, x, w, target):
    return torch.autograd.grad(fn(x, w, target), (x, w))


def peak_extra_bytes(fn, x, w, target, device):
    """Peak bytes one forward+backward allocated beyond what existed before it and the two gradients it returns."""
    gradients = x.numel() * x.element_size() + w.numel() * w.element_size()
    step = functools.partial(training_step, fn, x, w, target)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - gradients
    return common.peak_cpu_bytes(step) - gradients


def bench_case(n, h, v, dtype, device, repeats, eps, chunk_size):
    x, w, target = make_inputs(n, h, v, dtype, device)
    loss_fns = build_loss_fns(eps, chunk_size)
    check_loss_agreement(loss_fns, x, w, target)
    clock = common.make_clock(device)
    runners = {name: functools.partial(timed_step, fn, x, w, target, clock) for name, (fn, _) in loss_fns.items()}
    for run in runners.values():
        for _ in range(WARMUP_STEPS):
            run()
    medians = common.median_times(runners, repeats)
    peaks = {name: peak_extra_bytes(fn, x, w, target, device) for name, (fn, _) in loss_fns.items()}
    logits_bytes = n * v * x.element_size()
    rows = []
    for name in loss_fns:
        for phase in PHASES:
            rows.append({"impl": name, "eps": loss_fns[name][1], "phase": phase, "median_ms": medians[name][phase],
                         "peak_extra_bytes": peaks[name] if phase == "fwd+bwd" else None,
                         "logits_bytes": logits_bytes,
                         "ratio_vs_ours": medians[name][phase] / medians["ours_fused"][phase]})
    return rows


def print_table(rows):
    print(f"  {'impl':<24} {'eps':>4} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd':>9} {'x ours':>7} {'peak MiB':>9} "
          f"{'/logits':>8}")
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row["impl"], {})[row["phase"]] = row
    for name, phases in by_impl.items():
        total = phases["fwd+bwd"]
        print(f"  {name:<24} {total['eps']:>4g} {phases['forward']['median_ms']:>9.1f} "
              f"{phases['backward']['median_ms']:>9.1f} {total['median_ms']:>9.1f} {total['ratio_vs_ours']:>7.2f} "
              f"{total['peak_extra_bytes'] / 2**20:>9.1f} {total['peak_extra_bytes'] / total['logits_bytes']:>8.3f}")


def append_rows(path, context, rows):
    new_file = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: common.csv_value(value) for key, value in {**context, **row}.items()})


def main(argv=None):
    args = parse_args(argv)
    info = labelsmooth_ext.backend_info()
    context = common.run_context(args.device, info)
    context = {key: context[key] for key in ("date", "machine", "torch", "labelsmooth_ext", "backend", "device")}
    print(f"{context['machine']} | torch {context['torch']} | labelsmooth_ext {context['labelsmooth_ext']} "
          f"({context['backend']}) | {context['date']}")
    print(f"label_smoothing={args.eps} (and 0 where named), reduction=mean, every {IGNORED_ROW_STRIDE}th row ignored, "
          f"gradients for x and W, no bias, median of {args.repeats} repeats; ours fused with chunk_size="
          f"{args.chunk_size or 'automatic'}")
    cases = [(shape, dtype) for shape in args.shapes for dtype in args.dtypes]
    for index, ((n, h, v), dtype_name) in enumerate(cases, 1):
        logits_mib = n * v * common.DTYPES[dtype_name].itemsize / 2**20
        print(f"[{index}/{len(cases)}] {dtype_name} N={n} H={h} V={v} (logits {logits_mib:.0f} MiB)", flush=True)
        rows = bench_case(n, h, v, common.DTYPES[dtype_name], args.device, args.repeats, args.eps, args.chunk_size)
        print_table(rows)
        if args.results:
            append_rows(args.results, {**context, "dtype": dtype_name, "N": n, "H": h, "V": v}, rows)
    memory = ("torch.cuda.max_memory_allocated above what was allocated before the step" if args.device == "cuda"
              else "peak of PyTorch's CPU tensor allocations minus frees during the step (profiler events)")
    print(f"peak MiB: {memory}, minus the gradients of x and W; /logits: that over the size of the N x V logits.")
    print(f"appended to {args.results}" if args.results else "not recorded (--record appends to "
                                                             f"bench/{DEFAULT_RESULTS.name})")


if __name__ == "__main__":
    main()
