"""Tables (markdown, printed as is) and the report.md that ties the demo's outputs together."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

from labelsmooth_ext.demo.seed_summary import METRICS, SCORES, paired_differences, runs_by_smoothing, summarize
from labelsmooth_ext.demo.timing import EAGER, Timing
from labelsmooth_ext.demo.training import RunResult


def machine_facts() -> dict[str, str]:
    import labelsmooth_ext

    facts = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu count": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):
        # Timings on a busy machine are slower and noisier; this says how busy it was.
        facts["load average (1, 5, 15 min)"] = ", ".join(f"{load:.2f}" for load in os.getloadavg())
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    info = labelsmooth_ext.backend_info()
    facts.update({f"labelsmooth_ext {key}": str(value) for key, value in info.items()})
    return facts


def summary_table(runs: list[RunResult]) -> str:
    """One row per label smoothing: mean ± standard deviation of each metric over the seeds."""
    header = (
        "| label smoothing | seeds | " + " | ".join(metric.header for metric in METRICS) + " |\n"
        "|---:|---:|" + "---:|" * len(METRICS) + "\n"
    )
    seeds = {eps: len(group) for eps, group in runs_by_smoothing(runs).items()}
    rows = "".join(
        f"| {eps:g} | {seeds[eps]} | "
        + " | ".join(stats[metric.attribute].format(metric.digits) for metric in METRICS)
        + " |\n"
        for eps, stats in summarize(runs).items()
    )
    return header + rows


def difference_table(runs: list[RunResult], hard: float, smoothed: float) -> str:
    """The smoothed run minus the hard-target run of the same seed, and how often smoothing won or lost."""
    differences = paired_differences(runs, hard, smoothed)
    header = (
        f"| eps={smoothed:g} minus eps={hard:g}, same seed | " + " | ".join(metric.header for metric in SCORES) + " |\n"
        "|---|" + "---:|" * len(SCORES) + "\n"
    )
    mean_row = "| mean ± std of the difference | " + " | ".join(
        differences[metric.attribute].difference.format(metric.digits, signed=True) for metric in SCORES
    ) + " |\n"
    counts = [differences[metric.attribute] for metric in SCORES]
    count_row = f"| seeds where eps={smoothed:g} is better / worse / tied | " + " | ".join(
        f"{count.better} / {count.worse} / {count.tied}" for count in counts
    ) + " |\n"
    return header + mean_row + count_row


def per_seed_table(runs: list[RunResult]) -> str:
    header = (
        "| seed | label smoothing | best epoch | epochs trained | validation NLL | "
        + " | ".join(metric.header for metric in METRICS if metric.attribute != "best_epoch")
        + " | train time |\n"
        "|---:|---:|---:|---:|---:|" + "---:|" * (len(METRICS) - 1) + "---:|\n"
    )
    rows = "".join(
        f"| {run.seed} | {run.label_smoothing:g} | {run.best_epoch} | {run.epochs_trained} | {run.val_nll:.4f} | "
        + " | ".join(
            f"{getattr(run, metric.attribute):.{metric.digits}f}" for metric in METRICS if metric.attribute != "best_epoch"
        )
        + f" | {run.train_seconds:.1f} s |\n"
        for run in sorted(runs, key=lambda run: (run.seed, run.label_smoothing))
    )
    return header + rows


def timing_table(timings: list[Timing]) -> str:
    baselines = {(t.device, t.rows, t.classes): t.median_ms for t in timings if t.implementation == EAGER}
    header = (
        f"| device | shape | implementation | median ms | speed-up over eager {EAGER} |\n"
        "|---|---|---|---:|---:|\n"
    )
    rows = []
    for t in timings:
        baseline = baselines.get((t.device, t.rows, t.classes))
        if t.median_ms is None:
            time_cell, speedup_cell = t.note, "-"
        else:
            time_cell = f"{t.median_ms:.3f}"
            speedup_cell = f"{baseline / t.median_ms:.2f}x" if baseline else "-"
        rows.append(f"| {t.device} | {t.rows}x{t.classes} | {t.implementation} | {time_cell} | {speedup_cell} |\n")
    return header + "".join(rows)


def write_report(
    path: Path,
    *,
    command: str,
    method: str,
    runs: list[RunResult],
    reliability_png: str,
    reliability_seed: int,
    timings: list[Timing] | None,
    timing_setup: str,
    timing_png: str | None,
) -> None:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = "".join(f"- {key}: {value}\n" for key, value in machine_facts().items())
    hard, smoothed = runs_by_smoothing(runs)
    sections = [
        "# labelsmooth_ext demo\n",
        f"Run on {now} with `{command}`.\n",
        "## Label smoothing and calibration under noisy labels\n",
        "### Method\n",
        method + "\n",
        "### Results: mean ± standard deviation over seeds\n",
        summary_table(runs),
        "\nECE: expected calibration error over equal-width confidence bins; mean confidence "
        "above accuracy means over-confident, below means under-confident. *At T*: after dividing the logits by "
        "the temperature fitted on the validation split (temperature scaling), which changes confidence, never "
        "the predicted class. *Best epoch*: the epoch selected by early stopping.\n",
        "Both runs of a seed share the data split, the noisy labels, the initial weights and the batch order, so "
        "their difference isolates the effect of label smoothing:\n",
        difference_table(runs, hard, smoothed),
        f"\n### Reliability diagrams (seed {reliability_seed})\n",
        f"![reliability diagrams, seed {reliability_seed}]({reliability_png})\n",
        "### Every run\n",
        per_seed_table(runs),
    ]
    if timings is not None:
        sections += [
            "\n## Speed: forward + backward\n",
            timing_setup + "\n",
            timing_table(timings),
            f"\n![timings]({timing_png})\n",
        ]
    sections += ["\n## Machine\n", machine]
    path.write_text("\n".join(sections))
