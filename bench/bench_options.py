"""Benchmark the loss options of labelsmooth_ext.cross_entropy against the plain loss and against the
plain-PyTorch compositions users write today for the same option.

For each shape x dtype, in one run and the same repeats: ours without options, eager F.cross_entropy, and for
each option (z_loss, softcap, others, return_lse with a gradient through it, normalizer) ours with it and the
PyTorch composition that computes the same thing. Forward, backward and forward+backward medians; with
--record (or --results) one CSV row per (implementation, phase), in bench/results.csv's columns, the option
named in the impl column (ours[z_loss], eager[z_loss]). See bench/README.md.
"""

import argparse
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import labelsmooth_ext

from bench_cross_entropy import (
    DEFAULT_RESULTS,
    DEFAULT_SHAPES,
    DTYPES,
    IGNORE_INDEX,
    LOSS_ABS_TOL,
    LOSS_REL_TOL,
    LossMismatch,
    QUICK_REPEATS,
    QUICK_SHAPES,
    append_rows,
    check_results_header,
    make_clock,
    make_inputs,
    median_times,
    parse_dtypes,
    parse_shapes,
    run_context,
    summarize,
    timed_copy,
    timed_step,
    warm_up,
)

DEFAULT_REPEATS = 10
Z_LOSS = 1e-4  # PaLM's weight
SOFTCAP = 30.0  # Gemma 2's final-logit cap
LSE_WEIGHT = 1e-3  # the weight of the returned lse in the objective (a gradient must flow through it)
OPTIONS = ("z_loss", "softcap", "others", "return_lse", "normalizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", type=parse_dtypes, default="fp32,bf16", help=f"comma-separated, from "
                                                                                f"{','.join(DTYPES)}")
    parser.add_argument("--shapes", type=parse_shapes, help=f"comma-separated NxK (default {DEFAULT_SHAPES['cpu']})")
    parser.add_argument("--repeats", type=int, help=f"timed repeats per case (default {DEFAULT_REPEATS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: shapes {QUICK_SHAPES}, {QUICK_REPEATS} repeats")
    parser.add_argument("--record", action="store_true",
                        help=f"append the results to the tracked {DEFAULT_RESULTS.name} next to this script")
    parser.add_argument("--results", type=Path, help="append the results to this CSV instead")
    parser.add_argument("--eps", type=float, default=0.1, help="label smoothing")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES["cpu"])
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if args.record and args.results is None:
        args.results = DEFAULT_RESULTS
    return args


def valid_rows(target):
    return target != IGNORE_INDEX


def masked_lse(logits, target):
    """Each row's logsumexp, 0 on ignored rows (what ours returns, so both objectives are the same)."""
    lse = torch.logsumexp(logits.float(), dim=1)
    return torch.where(valid_rows(target), lse, torch.zeros_like(lse))


def option_losses(eps):
    """{option: (ours, eager composition)}, each a function of (logits, target) returning the scalar objective."""
    common = {"ignore_index": IGNORE_INDEX, "label_smoothing": eps}
    ours, plain = labelsmooth_ext.cross_entropy, F.cross_entropy

    def z_loss_composed(x, t):
        valid = valid_rows(t)
        return plain(x, t, **common) + Z_LOSS * masked_lse(x, t).square().sum() / valid.sum()

    def lse_ours(x, t):
        loss, lse = ours(x, t, return_lse=True, **common)
        return loss + LSE_WEIGHT * lse.sum()

    def others_composed(x, t):
        # fairseq's eps / (K - 1) on the other classes is PyTorch's eps * K / (K - 1) over all of them.
        k = x.shape[1]
        return plain(x, t, ignore_index=IGNORE_INDEX, label_smoothing=eps * k / (k - 1))

    def normalizer(t):
        return float(valid_rows(t).sum()) + 1.0  # a global token count: not this batch's

    return {
        "z_loss": (functools.partial(ours, z_loss=Z_LOSS, **common), z_loss_composed),
        "softcap": (functools.partial(ours, softcap=SOFTCAP, **common),
                    lambda x, t: plain(SOFTCAP * torch.tanh(x / SOFTCAP), t, **common)),
        "others": (functools.partial(ours, smoothing="others", **common), others_composed),
        "return_lse": (lse_ours, lambda x, t: plain(x, t, **common) + LSE_WEIGHT * masked_lse(x, t).sum()),
        "normalizer": (lambda x, t: ours(x, t, normalizer=normalizer(t), **common),
                       lambda x, t: plain(x, t, reduction="sum", **common) / normalizer(t)),
    }


def build_loss_fns(eps):
    common = {"ignore_index": IGNORE_INDEX, "label_smoothing": eps}
    loss_fns = {"ours": functools.partial(labelsmooth_ext.cross_entropy, **common),
                "eager": functools.partial(F.cross_entropy, **common)}
    for option, (ours, composed) in option_losses(eps).items():
        loss_fns[f"ours[{option}]"] = ours
        loss_fns[f"eager[{option}]"] = composed
    return loss_fns


def check_loss_agreement(loss_fns, logits, target):
    """Ours with each option must give the composition's objective (on the fp32 upcast), as in
    bench_cross_entropy.py: timings of a wrong result are worthless."""
    with torch.no_grad():
        for name in loss_fns:
            if not name.startswith("ours"):
                continue
            peer = name.replace("ours", "eager", 1)
            expected = loss_fns[peer](logits.float(), target).item()
            value = loss_fns[name](logits, target).float().item()
            if not math.isclose(value, expected, rel_tol=LOSS_REL_TOL, abs_tol=LOSS_ABS_TOL):
                raise LossMismatch(f"{name}={value:.7g} vs {peer} on fp32 logits={expected:.7g}")


def bench_case(n, k, dtype, repeats, eps):
    logits, target = make_inputs(n, k, dtype, "cpu")
    loss_fns = build_loss_fns(eps)
    check_loss_agreement(loss_fns, logits, target)
    clock = make_clock("cpu")
    runners = {name: functools.partial(timed_step, fn, logits, target, clock) for name, fn in loss_fns.items()}
    runners["copy"] = functools.partial(timed_copy, logits.detach(), torch.empty_like(logits), clock)
    unavailable = warm_up(runners)
    medians = median_times(runners, repeats)
    rows = summarize(medians, {name: None for name in loss_fns}, logits.numel() * logits.element_size(), ["active"])
    isa = labelsmooth_ext.backend_info().get("cpu_isa")
    for row in rows:
        if row["impl"].startswith("ours"):
            row["cpu_isa"] = isa
    return rows, unavailable


def print_table(rows, unavailable):
    fwd_bwd = {row["impl"]: row["median_ms"] for row in rows if row["phase"] == "fwd+bwd"}
    print(f"  {'option':<12} {'ours ms':>9} {'/ plain':>8} {'eager ms':>9} {'/ ours':>7}   (fwd+bwd)")
    print(f"  {'(plain)':<12} {fwd_bwd['ours']:>9.3f} {1:>8.3f} {fwd_bwd['eager']:>9.3f} "
          f"{fwd_bwd['eager'] / fwd_bwd['ours']:>7.2f}")
    for option in OPTIONS:
        ours, eager = fwd_bwd.get(f"ours[{option}]"), fwd_bwd.get(f"eager[{option}]")
        if ours is None or eager is None:
            continue
        print(f"  {option:<12} {ours:>9.3f} {ours / fwd_bwd['ours']:>8.3f} {eager:>9.3f} {eager / ours:>7.2f}")
    for name, reason in unavailable.items():
        print(f"  {name:<14} unavailable: {reason}")


def main(argv=None):
    args = parse_args(argv)
    if args.results:
        check_results_header(args.results)
    info = labelsmooth_ext.backend_info()
    context = run_context("cpu", info)
    print(f"{context['machine']} | torch {context['torch']} | labelsmooth_ext {context['labelsmooth_ext']} "
          f"({context['backend']}, CPU kernels {info.get('cpu_isa')})")
    print(f"label_smoothing={args.eps}, reduction=mean, every 50th row ignored, median of {args.repeats} repeats; "
          f"z_loss={Z_LOSS}, softcap={SOFTCAP}, return_lse: loss + {LSE_WEIGHT} * lse.sum()")
    print("/ plain: ours with the option over ours without.  / ours: the eager composition over ours with the option.")
    cases = [(shape, dtype) for shape in args.shapes for dtype in args.dtypes]
    for index, ((n, k), dtype_name) in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {dtype_name} N={n} K={k}", flush=True)
        try:
            rows, unavailable = bench_case(n, k, DTYPES[dtype_name], args.repeats, args.eps)
        except LossMismatch as mismatch:
            print(f"  SKIPPED (not timed), ours and the composition disagree: {mismatch}", flush=True)
            continue
        print_table(rows, unavailable)
        if args.results:
            append_rows(args.results, {**context, "dtype": dtype_name, "N": n, "K": k}, rows, "cpu")
    print(f"appended to {args.results}" if args.results else "not recorded (--record appends to bench/results.csv)")


if __name__ == "__main__":
    main()
