"""Command line of the demo: options, then training, timing, figures and report in order."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labelsmooth_ext.demo.data import DigitsSplits

DEFAULTS = {"seeds": 5, "epochs": 60, "shapes": "4096x1000,1024x32000,128x256000", "repeats": 15}
# Two seeds, so that the report still shows a standard deviation.
QUICK = {"seeds": 2, "epochs": 6, "shapes": "256x4000", "repeats": 3}
TIMING_PNG = "timing.png"
RELIABILITY_PNG = "reliability.png"
SEED_LIMIT = 2**32  # numpy and scikit-learn take seeds in [0, 2**32)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _fraction(low_inclusive: bool, high_inclusive: bool):
    low, high = ("[" if low_inclusive else "("), ("]" if high_inclusive else ")")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {low}0, 1{high}, got {text!r}") from None
        above = value >= 0 if low_inclusive else value > 0
        below = value <= 1 if high_inclusive else value < 1
        if not (above and below):
            raise argparse.ArgumentTypeError(f"expected a number in {low}0, 1{high}, got {value:g}")
        return value

    return parse


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, sep, classes = item.strip().lower().partition("x")
        if not (sep and rows.isdigit() and classes.isdigit() and int(rows) > 0 and int(classes) > 0):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated ROWSxCLASSES with positive integers (e.g. 4096x1000,1024x32000), "
                f"got {item.strip()!r}"
            )
        shapes.append((int(rows), int(classes)))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelsmooth-ext demo",
        description=(
            "For each of several seeds, trains the same MLP twice on scikit-learn's bundled handwritten digits "
            "with a fraction of the training labels flipped, once with hard targets and once with label "
            "smoothing, both through labelsmooth_ext.cross_entropy, each stopped early on the validation NLL; "
            "reports test accuracy, NLL and calibration (ECE, before and after temperature scaling fitted on "
            "the validation split) as mean +- standard deviation over the seeds, with the reliability diagrams "
            "of the first seed. Then times forward+backward of labelsmooth_ext.cross_entropy against eager and "
            "torch.compile'd F.cross_entropy. Writes report.md and two PNGs to --out. "
            "Needs scikit-learn and matplotlib."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("labelsmooth-demo"),
                        help="output directory, created if missing; files in it are overwritten (default: %(default)s)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="first seed; the runs use seeds SEED, SEED+1, ... Each seed sets the split, the label "
                             "noise, the initial weights and the batch order: the same seeds give the same metrics "
                             "(default: %(default)s)")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help=f"number of seeds; the report gives mean +- standard deviation over them "
                             f"(default {DEFAULTS['seeds']}, {QUICK['seeds']} with --quick)")
    parser.add_argument("--noise", type=_fraction(True, False), default=0.2,
                        help="fraction of training labels replaced by a different, random class, in [0, 1) "
                             "(default: %(default)s)")
    parser.add_argument("--smoothing", type=_fraction(False, True), default=0.1,
                        help="label smoothing eps of the second run, in (0, 1]; the first run uses 0 "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help=f"most training epochs per run (default {DEFAULTS['epochs']}, {QUICK['epochs']} with --quick)")
    parser.add_argument("--patience", type=_positive_int, default=10,
                        help="early stopping: a run stops after this many epochs without a lower validation NLL, "
                             "and its epoch with the lowest one is evaluated (default: %(default)s)")
    parser.add_argument("--hidden", type=_positive_int, default=256, help="width of the MLP's two hidden layers (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="training batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate, positive (default: %(default)s)")
    parser.add_argument("--bins", type=_positive_int, default=15, help="equal-width confidence bins for ECE and the reliability diagram (default: %(default)s)")
    parser.add_argument("--shapes", type=_shapes, default=None,
                        help=f"logits shapes to time, ROWSxCLASSES,... (default {DEFAULTS['shapes']}; "
                             f"{QUICK['shapes']} with --quick)")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help=f"timed calls per implementation and shape; the median is reported "
                             f"(default {DEFAULTS['repeats']}, {QUICK['repeats']} with --quick)")
    parser.add_argument("--skip-timing", action="store_true",
                        help=f"skip the timing part: only training, calibration and its figure (a {TIMING_PNG} "
                             f"left in --out by an earlier run is removed)")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds' run: fewer seeds and epochs, small shapes, few repeats "
                             "(explicit --seeds/--epochs/--shapes/--repeats still win)")
    return parser


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    if not args.lr > 0:
        parser.error(f"argument --lr: expected a positive number, got {args.lr:g}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {str(args.out)!r} exists and is not a directory")
    preset = QUICK if args.quick else DEFAULTS
    if args.seeds is None:
        args.seeds = preset["seeds"]
    if args.seed + args.seeds > SEED_LIMIT:
        parser.error(f"argument --seeds: seeds {args.seed}..{args.seed + args.seeds - 1} go past {SEED_LIMIT - 1}, "
                     f"the largest seed")
    if args.epochs is None:
        args.epochs = preset["epochs"]
    if args.shapes is None:
        args.shapes = _shapes(preset["shapes"])
    if args.repeats is None:
        args.repeats = preset["repeats"]
    return args


def _missing_dependencies() -> list[str]:
    import importlib.util

    return [name for module, name in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
            if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _resolve(parser.parse_args(argv), parser)
    missing = _missing_dependencies()
    if missing:
        print(f"error: the demo needs {' and '.join(missing)}: pip install {' '.join(missing)}", file=sys.stderr)
        return 1

    # Imported here so that --help and option errors answer without loading torch and the kernels.
    from labelsmooth_ext.demo.data import load_digits_splits
    from labelsmooth_ext.demo.plots import save_reliability_diagram, save_timing_plot
    from labelsmooth_ext.demo.report import difference_table, summary_table, timing_table, write_report
    from labelsmooth_ext.demo.timing import time_all
    from labelsmooth_ext.demo.training import TrainingConfig, train_and_evaluate

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    label_smoothings = (0.0, args.smoothing)
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        splits = load_digits_splits(args.noise, seed)
        config = TrainingConfig(args.epochs, args.patience, args.hidden, args.batch_size, args.lr, args.bins, seed)
        log(f"Seed {seed}: {splits.n_flipped} of {len(splits.train_y)} training labels flipped")
        seed_runs = [train_and_evaluate(splits, eps, config, log) for eps in label_smoothings]
        if seed == args.seed:
            # The diagrams of one seed; the tables cover all of them.
            save_reliability_diagram(seed_runs, splits.test_y, args.bins, args.out / RELIABILITY_PNG)
        runs += seed_runs
    log("\n" + summary_table(runs))
    log(difference_table(runs, *label_smoothings))

    timings, timing_png = None, None
    timing_setup = (
        f"float32 logits, random class targets, label_smoothing={args.smoothing:g}, reduction='mean'; "
        f"median of {args.repeats} interleaved calls after 2 warm-up calls (which include torch.compile's "
        f"compilation); times include the backward (torch.autograd.grad of the loss)."
    )
    if args.skip_timing:
        # A picture from an earlier run would sit next to a report that no longer describes it.
        (args.out / TIMING_PNG).unlink(missing_ok=True)
    else:
        log("Timing forward+backward")
        timings = time_all(args.shapes, args.repeats, args.smoothing, args.seed, log)
        log("\n" + timing_table(timings))
        timing_png = TIMING_PNG
        save_timing_plot(timings, args.out / timing_png)

    command = shlex.join(["labelsmooth-ext", "demo", *(sys.argv[1:] if argv is None else argv)])
    write_report(
        args.out / "report.md",
        command=command,
        method=_method(args, splits),
        runs=runs,
        reliability_png=RELIABILITY_PNG,
        reliability_seed=args.seed,
        timings=timings,
        timing_setup=timing_setup,
        timing_png=timing_png,
    )
    log(f"Wrote {args.out / 'report.md'} and its figures in {time.perf_counter() - start:.0f} s")
    return 0


def _method(args: argparse.Namespace, splits: DigitsSplits) -> str:
    """How the numbers were obtained; the split sizes and the number of flipped labels depend only on
    the data set and --noise, so any seed's splits give them."""
    last_seed = args.seed + args.seeds - 1
    seeds = f"seed {args.seed}" if args.seeds == 1 else f"{args.seeds} seeds ({args.seed} to {last_seed})"
    return (
        f"- **Data**: scikit-learn's 8x8 handwritten digits (10 classes), split per seed (stratified, 60/20/20) into "
        f"{len(splits.train_y)} train / {len(splits.val_y)} validation / {len(splits.test_y)} test images.\n"
        f"- **Label noise**: {splits.n_flipped} training labels ({args.noise:.0%}), chosen per seed, are replaced by "
        f"a different random class; validation and test labels are clean.\n"
        f"- **Model and training**: MLP 64-{args.hidden}-{args.hidden}-10 (ReLU), Adam lr {args.lr:g}, batch "
        f"{args.batch_size}, loss labelsmooth_ext.cross_entropy with hard targets (label_smoothing=0) and with "
        f"label_smoothing={args.smoothing:g}; both runs of a seed start from the same initial weights and see "
        f"the same batch order.\n"
        f"- **Early stopping**: after every epoch the validation NLL (unsmoothed cross-entropy) is measured; a run "
        f"stops once {args.patience} epochs in a row bring no lower one (or after {args.epochs} epochs), and the "
        f"weights of its epoch with the lowest validation NLL are the ones evaluated.\n"
        f"- **Temperature scaling**: the temperature T minimising the NLL on the validation split (the split "
        f"that also selects the epoch; the test split is never used to choose anything) divides the test logits.\n"
        f"- **Seeds**: {seeds}; each seed sets the split, the noisy labels, the initial weights and the batch "
        f"order. Tables give the mean ± sample standard deviation over seeds; the reliability diagrams show "
        f"seed {args.seed}.\n"
        f"- **Metrics**: on the test split; ECE over {args.bins} equal-width confidence bins.\n"
    )
