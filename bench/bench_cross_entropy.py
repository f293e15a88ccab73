"""Benchmark labelsmooth_ext.cross_entropy against its peers, relative to the machine's copy bandwidth.

For each shape x dtype: forward, backward and forward+backward times (medians), the peak extra memory of
one forward+backward, and the time of one copy of the logits, for ours (on each CPU instruction set asked
for), eager and compiled PyTorch, and our pure-PyTorch fallback. Prints a table per case; with --record (or
--results) also appends one CSV row per (implementation, instruction set, phase). See bench/README.md.
"""

import argparse
import contextlib
import csv
import datetime
import functools
import math
import os
import platform
import random
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import labelsmooth_ext
from labelsmooth_ext import reference

IGNORE_INDEX = -100
IGNORED_ROW_STRIDE = 50  # every 50th row is ignored, so the ignore path is part of what is timed
WARMUP_STEPS = 3  # torch.compile compiles forward and backward during the first steps
DEFAULT_REPEATS = 20
QUICK_REPEATS = 3
DEFAULT_SHAPES = {
    "cpu": "65536x10,8192x1000,2048x32000,512x128256",
    "cuda": "262144x10,65536x1000,16384x32000,16384x128256,8192x256000",
}
QUICK_SHAPES = "512x10,64x1000,16x32000"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.csv"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (rel, abs) tolerance on the mean loss of ours vs eager on the fp32 upcast of the same logits. Both
# compute in fp32 from the same values and ours returns an fp32 loss for half-precision logits, so only
# the order of summation differs, whatever the input dtype.
LOSS_REL_TOL, LOSS_ABS_TOL = 1e-4, 1e-5
# Bytes a fused implementation must move per phase, in units of the logits' size: the forward reads
# them; the backward reads them and writes the gradient. A copy moves 2 units.
PHASE_TRAFFIC = {"forward": 1, "backward": 2, "fwd+bwd": 3}
COPY_TRAFFIC = 2
# Liger writes the gradient into its input during the forward, so it gets a private copy of the logits
# rather than rewriting the ones the other implementations read.
OVERWRITES_LOGITS = {"liger"}
REDUCTION_MEAN = 1  # the ops' reduction code (at::Reduction numbering)
CSV_COLUMNS = [
    "date", "machine", "cpu_isa", "torch", "labelsmooth_ext", "backend", "liger_kernel", "device", "dtype",
    "N", "K", "impl", "phase", "median_ms", "peak_mem_bytes", "bandwidth_fraction", "ratio_vs_ours",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", type=parse_dtypes, default="fp32,bf16",
                        help=f"comma-separated, from {','.join(DTYPES)}")
    parser.add_argument("--shapes", type=parse_shapes, help="comma-separated NxK; default depends on --device")
    parser.add_argument("--repeats", type=int, help=f"timed repeats per case (default {DEFAULT_REPEATS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: shapes {QUICK_SHAPES}, {QUICK_REPEATS} repeats")
    parser.add_argument("--cpu-isas", type=parse_cpu_isas, default="active",
                        help="CPU instruction sets to run ours on, each timed in the same repeats: comma-separated "
                             "from avx512, avx2, baseline; 'all' (every one this CPU supports) or 'active' (the one "
                             "LABELSMOOTH_CPU_ISA or the CPU selects; the default)")
    parser.add_argument("--record", action="store_true",
                        help=f"append the results to the tracked {DEFAULT_RESULTS.name} next to this script")
    parser.add_argument("--results", type=Path, help="append the results to this CSV instead (implies recording)")
    parser.add_argument("--eps", type=float, default=0.1, help="label smoothing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.shapes = args.shapes or parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES[args.device])
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if args.record and args.results is None:
        args.results = DEFAULT_RESULTS
    try:
        args.cpu_isas = resolve_cpu_isas(args.cpu_isas, args.device)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_sizes(text, form="NxK"):
    """Comma-separated shapes of the given form (its letters joined by x), each size positive."""
    try:
        shapes = [tuple(int(size) for size in shape.lower().split("x")) for shape in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != len(form.split("x")) or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"expected comma-separated {form} with positive sizes, got {text!r}")
    return shapes


def parse_shapes(text):
    return parse_sizes(text, "NxK")


def parse_dtypes(text):
    names = text.split(",")
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtypes {unknown}; known: {', '.join(DTYPES)}")
    return names


def parse_cpu_isas(text):
    names = [name.strip() for name in text.split(",")]
    if names in (["all"], ["active"]):
        return names[0]
    unknown = [name for name in names if name not in ("avx512", "avx2", "baseline")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown instruction sets {unknown}; known: avx512, avx2, baseline "
                                         "(or all, active)")
    return names


def compiled_kernels():
    """The compiled module, or None when the fallback is the backend (no instruction sets to choose)."""
    if labelsmooth_ext.backend_info()["backend"] != "compiled":
        return None
    from labelsmooth_ext import _C

    return _C


def resolve_cpu_isas(request, device):
    """The instruction sets to run ours on, checked against this CPU: [None] where there is no choice
    (CUDA, or the fallback backend)."""
    module = compiled_kernels()
    if device != "cpu" or module is None:
        return [None]
    if request == "active":
        return [module.cpu_isa()]
    supported = list(module.build_info()["cpu_isas"])
    if request == "all":
        return supported
    missing = [name for name in request if name not in supported]
    if missing:
        raise ValueError(f"--cpu-isas {','.join(request)}: this CPU cannot run {missing}; it supports {supported}")
    return request


def torch_cpu_capability():
    """The instruction set of ATen's CPU kernels (eager and compiled PyTorch, the fallback, the copy)."""
    return torch.backends.cpu.get_cpu_capability().lower()


def describe_machine(device):
    """The hardware, without the host's name: GPU name and SM count, or CPU model and usable cores."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.name}, {props.multi_processor_count} SMs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, {torch.get_num_threads()} torch threads"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def liger_loss_or_reason(eps):
    """Liger's loss module, or why it cannot be measured here."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as exc:  # missing, or installed but broken against this torch/triton
        return None, f"liger_kernel does not import ({exc})"
    return LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=eps, reduction="mean"), None


def liger_version():
    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return ""


def run_context(device, info):
    """The CSV columns shared by every row of this run."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(device),
        "cpu_isa": "",
        "torch": torch.__version__,
        "labelsmooth_ext": info["version"],
        "backend": info["backend"],
        "liger_kernel": liger_version() if device == "cuda" else "",
        "device": device,
    }


def make_inputs(n, k, dtype, device):
    torch.manual_seed(0)
    logits = torch.randn(n, k, dtype=dtype, device=device).requires_grad_()
    target = torch.randint(0, k, (n,), device=device)
    target[::IGNORED_ROW_STRIDE] = IGNORE_INDEX
    return logits, target


class FallbackLoss(torch.autograd.Function):
    """The pure-PyTorch fallback: the reference functions that the fallback backend registers as the ops,
    called directly, so they can be measured in the same run as the compiled kernels."""

    @staticmethod
    def forward(ctx, logits, target, eps):
        loss, lse, mass = reference.ls_cross_entropy_forward(logits, target, None, IGNORE_INDEX, eps, 0, None,
                                                             REDUCTION_MEAN)
        ctx.save_for_backward(logits, target, lse, mass)
        ctx.eps = eps
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse, mass = ctx.saved_tensors
        grad = reference.ls_cross_entropy_backward(grad_loss, None, logits, target, None, lse, mass, IGNORE_INDEX,
                                                   ctx.eps, 0, None, REDUCTION_MEAN)
        return grad, None, None


def fallback_loss(logits, target, eps):
    return FallbackLoss.apply(logits, target, eps)


def ours_on(isa, common):
    """labelsmooth_ext.cross_entropy with the compiled CPU kernels of `isa` (None: as they are)."""
    def loss(logits, target):
        if isa is not None:
            compiled_kernels().set_cpu_isa(isa)
        return labelsmooth_ext.cross_entropy(logits, target, **common)
    return loss


def ours_name(isa, isas):
    """'ours' alone when only one instruction set is measured, else 'ours@<isa>'."""
    return "ours" if len(isas) == 1 else f"ours@{isa}"


def build_loss_fns(device, eps, isas):
    """The implementations to compare, each taking (logits, target); also the reasons for any left out.
    The backward of ours runs on the instruction set its forward chose: each step runs entirely on it."""
    common = {"ignore_index": IGNORE_INDEX, "reduction": "mean", "label_smoothing": eps}
    # A fresh compile per case: dynamic=False specialises to the shape, as a training loop would see it,
    # and resetting keeps earlier cases from using up the recompile limit.
    torch._dynamo.reset()
    loss_fns = {ours_name(isa, isas): ours_on(isa, common) for isa in isas}
    loss_fns.update({
        "eager": functools.partial(F.cross_entropy, **common),
        "compile": functools.partial(torch.compile(F.cross_entropy, dynamic=False), **common),
        "fallback": functools.partial(fallback_loss, eps=eps),
    })
    unavailable = {}
    if device == "cuda":
        liger_loss, reason = liger_loss_or_reason(eps)
        if liger_loss is None:
            unavailable["liger"] = reason
        else:
            loss_fns["liger"] = liger_loss
    return loss_fns, unavailable


class LossMismatch(Exception):
    """Ours and eager disagree on the loss: timings of a wrong result are worthless, so the case is skipped."""


def check_loss_agreement(loss_fns, logits, target, checked):
    """Raises LossMismatch unless every implementation in `checked` (ours on each instruction set, the
    fallback) agrees with eager on the loss.
    Eager runs on the fp32 upcast: in half precision it reduces in the input dtype (about 1% off in bf16
    on CPU, inf in fp16 once the sum over rows passes 65504), which would hide or fake a mismatch."""
    with torch.no_grad():
        eager = loss_fns["eager"](logits.float(), target).item()
        for name in checked:
            value = loss_fns[name](logits, target).float().item()
            if not math.isclose(value, eager, rel_tol=LOSS_REL_TOL, abs_tol=LOSS_ABS_TOL):
                raise LossMismatch(f"loss {name}={value:.7g} vs eager on fp32 logits={eager:.7g} "
                                   f"(rel_tol={LOSS_REL_TOL}, abs_tol={LOSS_ABS_TOL})")


def make_clock(device):
    """mark() -> timestamp and elapsed_ms(a, b). On CUDA, events time the GPU's work, not the launches;
    reading an interval waits for its end, so no two measured steps overlap."""
    if device == "cuda":
        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def elapsed_ms(start, end):
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def mark():
            return time.perf_counter()

        def elapsed_ms(start, end):
            return (end - start) * 1e3
    return mark, elapsed_ms


def training_step(loss_fn, logits, target):
    # autograd.grad rather than backward(): accumulating into .grad would add a read-modify-write of the
    # gradient to every step after the first.
    (grad,) = torch.autograd.grad(loss_fn(logits, target), logits)
    return grad


def timed_step(loss_fn, logits, target, clock):
    mark, elapsed_ms = clock
    start = mark()
    loss = loss_fn(logits, target)
    middle = mark()
    torch.autograd.grad(loss, logits)
    end = mark()
    forward, backward = elapsed_ms(start, middle), elapsed_ms(middle, end)
    return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}


def timed_copy(source, destination, clock):
    mark, elapsed_ms = clock
    start = mark()
    destination.copy_(source)
    end = mark()
    return {"copy": elapsed_ms(start, end)}


def warm_up(runners):
    """Runs each implementation a few times and drops the peers that fail, returning why they failed.
    A failure of ours or of the fallback is a bug in what is being measured, so it is raised."""
    unavailable = {}
    for name, run in list(runners.items()):
        try:
            for _ in range(WARMUP_STEPS):
                run()
        except Exception as exc:
            if name.startswith("ours") or name == "fallback":
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            unavailable[name] = f"{type(exc).__name__}: {first_line}"
            del runners[name]
    return unavailable


def median_times(runners, repeats):
    """Median ms per implementation and phase. Every repeat runs every implementation once, so drift in
    clocks or load hits all alike, in an order shuffled anew each repeat (from a fixed seed), so that none
    always follows the same neighbour: what ran just before (the memory it freed, the caches it filled)
    changes a step's time. A rotation would keep each one's predecessor the same in all but one repeat."""
    samples = {name: {} for name in runners}
    order = random.Random(0)
    for _ in range(repeats):
        names = list(runners)
        order.shuffle(names)
        for name in names:
            for phase, ms in runners[name]().items():
                samples[name].setdefault(phase, []).append(ms)
    return {name: {phase: statistics.median(times) for phase, times in phases.items()}
            for name, phases in samples.items()}


def peak_step_bytes(loss_fn, logits, target, device):
    """Peak bytes allocated on top of what existed before one forward+backward (the gradient included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        training_step(loss_fn, logits, target)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return peak_cpu_step_bytes(loss_fn, logits, target)


@contextlib.contextmanager
def native_stderr_silenced():
    """The profiler's C++ side (kineto) writes start/stop lines straight to file descriptor 2, whatever
    the log level; they would be mixed into the results. Python-level warnings still go through."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_cpu_step_bytes(loss_fn, logits, target):
    return peak_cpu_bytes(functools.partial(training_step, loss_fn, logits, target))


def peak_cpu_bytes(step):
    """The CPU allocator keeps no statistics, so replay its allocation and free events from the profiler:
    the peak of their running sum is the most tensor memory step() held at once. The raw event stream
    is used because the public event list folds allocations into per-op totals and loses their order."""
    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((event.start_ns(), event.nbytes())
                    for event in prof.profiler.kineto_results.events() if event.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def bench_case(n, k, dtype, device, repeats, eps, isas):
    """Result rows for one shape and dtype, and the reasons for any peers left out."""
    logits, target = make_inputs(n, k, dtype, device)
    loss_fns, unavailable = build_loss_fns(device, eps, isas)
    check_loss_agreement(loss_fns, logits, target, [ours_name(isa, isas) for isa in isas] + ["fallback"])
    logits_for = {name: logits.detach().clone().requires_grad_() if name in OVERWRITES_LOGITS else logits
                  for name in loss_fns}
    clock = make_clock(device)
    runners = {name: functools.partial(timed_step, fn, logits_for[name], target, clock)
               for name, fn in loss_fns.items()}
    runners["copy"] = functools.partial(timed_copy, logits.detach(), torch.empty_like(logits), clock)
    unavailable.update(warm_up(runners))
    medians = median_times(runners, repeats)
    peaks = {name: peak_step_bytes(loss_fns[name], logits_for[name], target, device)
             for name in medians if name != "copy"}
    return summarize(medians, peaks, logits.numel() * logits.element_size(), isas), unavailable


def summarize(medians, peaks, logits_bytes, isas):
    """One row per (implementation, phase); bandwidth is relative to the copy measured in the same run.
    Several instruction sets: each gets rows of impl 'ours'; every ratio is to ours on the first one."""
    reference_ours = ours_name(isas[0], isas)
    isa_of = {ours_name(isa, isas): isa for isa in isas}
    copy_ms = medians["copy"]["copy"]
    copy_bytes_per_ms = COPY_TRAFFIC * logits_bytes / copy_ms
    rows = [{"impl": "copy", "cpu_isa": None, "phase": "copy", "median_ms": copy_ms, "peak_mem_bytes": None,
             "bandwidth_fraction": 1.0, "ratio_vs_ours": None}]
    for phase, traffic in PHASE_TRAFFIC.items():
        for impl in peaks:
            ms = medians[impl][phase]
            rows.append({
                "impl": "ours" if impl in isa_of else impl, "cpu_isa": isa_of.get(impl), "phase": phase,
                "median_ms": ms,
                # Peak memory is measured over the whole step, so it belongs to the fwd+bwd row.
                "peak_mem_bytes": peaks[impl] if phase == "fwd+bwd" else None,
                "bandwidth_fraction": traffic * logits_bytes / ms / copy_bytes_per_ms,
                "ratio_vs_ours": ms / medians[reference_ours][phase],
            })
    return rows


def row_name(row):
    return row["impl"] if row["cpu_isa"] is None else f"{row['impl']}@{row['cpu_isa']}"


def print_table(rows, unavailable):
    copy_ms = rows[0]["median_ms"]
    print(f"  {'impl':<14} {'phase':<8} {'median ms':>10} {'x ours':>7} {'bw frac':>8} {'/copy':>7} {'peak MiB':>9}")
    for row in rows:
        ratio = "" if row["ratio_vs_ours"] is None else f"{row['ratio_vs_ours']:.2f}"
        peak = "" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.1f}"
        print(f"  {row_name(row):<14} {row['phase']:<8} {row['median_ms']:>10.4f} {ratio:>7} "
              f"{row['bandwidth_fraction']:>8.3f} {row['median_ms'] / copy_ms:>7.2f} {peak:>9}")
    for name, reason in unavailable.items():
        print(f"  {name:<14} unavailable: {reason}")
    print_targets(rows)


def print_targets(rows):
    """Forward+backward of ours on each instruction set against the targets (README: >= 3x eager, >= 2x
    torch.compile, and at K >= 32000 fp32 within 2.5x one copy of the logits)."""
    fwd_bwd = {row_name(row): row["median_ms"] for row in rows if row["phase"] == "fwd+bwd"}
    copy_ms = rows[0]["median_ms"]
    for row in rows:
        if row["impl"] != "ours" or row["phase"] != "fwd+bwd":
            continue
        ms = row["median_ms"]
        peers = ", ".join(f"{fwd_bwd[peer] / ms:.2f}x {peer}" for peer in ("eager", "compile", "fallback")
                          if peer in fwd_bwd)
        print(f"  {row_name(row)} fwd+bwd: {peers}; {ms / copy_ms:.2f}x one copy")


def check_results_header(path):
    """Appending rows under a different header would silently misalign columns."""
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as results:
            header = next(csv.reader(results))
        if header != CSV_COLUMNS:
            raise SystemExit(f"{path} has columns {header}, this script writes {CSV_COLUMNS}; use another --results")


def append_rows(path, context, rows, device):
    """cpu_isa: ours' instruction set on its rows; on the others (CPU), the one ATen's kernels use."""
    write_header = not path.exists() or not path.stat().st_size
    with open(path, "a", newline="") as results:
        writer = csv.DictWriter(results, fieldnames=CSV_COLUMNS)
        if write_header:
            writer.writeheader()
        for row in rows:
            isa = row["cpu_isa"] or (torch_cpu_capability() if device == "cpu" else "")
            writer.writerow({**context, **{key: csv_value(value) for key, value in row.items()}, "cpu_isa": isa})


def csv_value(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def main(argv=None):
    args = parse_args(argv)
    if args.results:
        check_results_header(args.results)
    info = labelsmooth_ext.backend_info()
    context = run_context(args.device, info)
    isas = args.cpu_isas
    isa_note = "" if isas == [None] else (f" | ours on CPU instruction sets {', '.join(isas)} (this CPU supports "
                                          f"{', '.join(info['cpu_isas'])}); PyTorch on {torch_cpu_capability()}")
    print(f"{context['machine']} | torch {context['torch']} | labelsmooth_ext {context['labelsmooth_ext']} "
          f"({context['backend']}: {info['reason']}){isa_note}")
    print(f"label_smoothing={args.eps}, reduction=mean, every {IGNORED_ROW_STRIDE}th row ignored, "
          f"median of {args.repeats} repeats")
    print("x ours: time / ours' time.  bw frac: (phase bytes / time) / (copy bytes / copy time), with phase bytes = "
          "1x (fwd), 2x (bwd), 3x (fwd+bwd) the logits.  /copy: time / copy time.")
    cases = [(shape, dtype) for shape in args.shapes for dtype in args.dtypes]
    for index, ((n, k), dtype_name) in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {dtype_name} N={n} K={k}", flush=True)
        try:
            rows, unavailable = bench_case(n, k, DTYPES[dtype_name], args.device, args.repeats, args.eps, isas)
        except LossMismatch as mismatch:
            print(f"  SKIPPED (not timed), ours and eager disagree: {mismatch}", flush=True)
            continue
        print_table(rows, unavailable)
        if args.results:
            append_rows(args.results, {**context, "dtype": dtype_name, "N": n, "K": k}, rows, args.device)
    if args.device == "cuda":
        memory_meaning = "torch.cuda.max_memory_allocated above what was allocated before the step"
    else:
        memory_meaning = ("peak of PyTorch's CPU tensor allocations minus frees during the step (profiler events); "
                          "memory a kernel takes outside PyTorch's allocator is not seen")
    print(f"peak MiB: extra memory of one forward+backward, gradient included: {memory_meaning}.")
    if args.results:
        print(f"appended to {args.results}")
    else:
        print("not recorded (--record appends to bench/results.csv)")


if __name__ == "__main__":
    main()
