"""The demo's two figures, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from labelsmooth_ext.calibration import reliability_diagram
from labelsmooth_ext.demo.timing import EAGER, Timing
from labelsmooth_ext.demo.training import RunResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_reliability_diagram(runs: list[RunResult], test_y: torch.Tensor, n_bins: int, path: Path) -> None:
    """The runs of one seed (``test_y``: that seed's test labels), one column each. Top: accuracy per
    confidence bin against the diagonal of perfect calibration (bars below it are over-confident,
    above it under-confident). Bottom: how many test samples each bin holds."""
    seeds = {run.seed for run in runs}
    if len(seeds) != 1:
        raise ValueError(f"a reliability diagram shows the runs of one seed, got seeds {sorted(seeds)}")
    plt = _pyplot()
    figure, axes = plt.subplots(
        2, len(runs), figsize=(5 * len(runs), 6.5), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    for column, run in enumerate(runs):
        bins = reliability_diagram(run.test_logits, test_y, n_bins, from_logits=True)
        edges = bins.bin_edges.numpy()
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        occupied = (bins.counts > 0).numpy()
        accuracy = bins.accuracy.numpy()[occupied]
        confidence = bins.confidence.numpy()[occupied]

        top, bottom = axes[0, column], axes[1, column]
        top.bar(centers[occupied], accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        # Hatched and unfilled, so the gap reads the same above the accuracy bar (over-confident)
        # as inside it (under-confident).
        top.bar(
            centers[occupied], confidence - accuracy, bottom=accuracy, width=width,
            fill=False, hatch="//", edgecolor="tab:red", label="gap to mean confidence",
        )
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        kind = "hard targets" if run.label_smoothing == 0 else "label smoothing"
        top.set_title(
            f"{kind}, eps={run.label_smoothing:g}, epoch {run.best_epoch}\n"
            f"ECE {run.ece:.3f} (at T: {run.ece_scaled:.3f}), accuracy {run.accuracy:.3f}"
        )

        bottom.bar(centers, bins.counts.numpy(), width=width, edgecolor="black", color="tab:gray")
        bottom.set_xlabel("confidence (largest softmax probability)")
        bottom.set_ylabel("test samples")
    figure.suptitle(f"Reliability on the clean test split, seed {seeds.pop()}")
    # One legend above the panels: inside them it would hide bars wherever they reach.
    figure.legend(handles=axes[0, 0].get_legend_handles_labels()[0], loc="upper center", ncol=3, fontsize=8,
                  bbox_to_anchor=(0.5, 0.95))
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_timing_plot(timings: list[Timing], path: Path) -> None:
    """Speed-up over eager F.cross_entropy per shape (higher is better), one panel per device;
    each bar is labelled with its median time."""
    plt = _pyplot()
    devices = list(dict.fromkeys(t.device for t in timings))
    implementations = list(dict.fromkeys(t.implementation for t in timings))
    figure, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices) + 2, 4.5), squeeze=False)
    width = 0.8 / len(implementations)
    labelled: set[str] = set()
    for axis, device in zip(axes[0], devices):
        shapes = list(dict.fromkeys((t.rows, t.classes) for t in timings if t.device == device))
        by_key = {(t.rows, t.classes, t.implementation): t for t in timings if t.device == device}
        for index, name in enumerate(implementations):
            for position, (rows, classes) in enumerate(shapes):
                timing = by_key[(rows, classes, name)]
                baseline = by_key[(rows, classes, EAGER)].median_ms
                x = position + (index - (len(implementations) - 1) / 2) * width
                if timing.median_ms is None or baseline is None:
                    axis.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=8, rotation=90)
                    continue
                speedup = baseline / timing.median_ms
                axis.bar(x, speedup, width=width, color=f"C{index}", label=None if name in labelled else name)
                labelled.add(name)
                label = f"{timing.median_ms:.0f} ms" if timing.median_ms >= 100 else f"{timing.median_ms:.3g} ms"
                axis.text(x, speedup, label, ha="center", va="bottom", fontsize=7)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(shapes)), [f"{rows}x{classes}" for rows, classes in shapes])
        axis.set_xlabel("logits shape (rows x classes), float32")
        axis.set_ylabel(f"speed-up over eager {EAGER}")
        axis.set_title(f"forward+backward, {device}")
        axis.margins(y=0.15)
    handles = [h for axis in axes[0] for h in axis.get_legend_handles_labels()[0]]
    figure.legend(handles=handles, loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 0.78, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
