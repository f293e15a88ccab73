"""Tables (markdown, printed as is) and the report.md that ties the demo's outputs together."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

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


def calibration_table(runs: list[RunResult]) -> str:
    header = (
        "| label smoothing | test accuracy | mean confidence | NLL | ECE | fitted T | NLL at T | ECE at T | train time |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = "".join(
        f"| {run.label_smoothing:g} | {run.accuracy:.4f} | {run.mean_confidence:.4f} | {run.nll:.4f} | "
        f"{run.ece:.4f} | {run.temperature:.3f} | {run.nll_scaled:.4f} | {run.ece_scaled:.4f} | "
        f"{run.train_seconds:.1f} s |\n"
        for run in runs
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
    setup: str,
    runs: list[RunResult],
    reliability_png: str,
    timings: list[Timing] | None,
    timing_setup: str,
    timing_png: str | None,
) -> None:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = "".join(f"- {key}: {value}\n" for key, value in machine_facts().items())
    sections = [
        "# labelsmooth_ext demo\n",
        f"Run on {now} with `{command}`.\n",
        "## Label smoothing and calibration under noisy labels\n",
        setup + "\n",
        calibration_table(runs),
        "\nECE: expected calibration error over equal-width confidence bins; mean confidence "
        "above accuracy means over-confident, below means under-confident. *At T*: after dividing the logits by "
        "the temperature fitted on the validation split (temperature scaling), which changes confidence, never "
        "the predicted class.\n",
        f"![reliability diagrams]({reliability_png})\n",
    ]
    if timings is not None:
        sections += [
            "## Speed: forward + backward\n",
            timing_setup + "\n",
            timing_table(timings),
            f"\n![timings]({timing_png})\n",
        ]
    sections += ["## Machine\n", machine]
    path.write_text("\n".join(sections))
