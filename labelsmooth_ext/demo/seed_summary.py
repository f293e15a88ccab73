"""Aggregation of the demo's runs over seeds: mean and sample standard deviation of each metric per
label smoothing, and the per-seed differences between the smoothed and the hard-target run."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from labelsmooth_ext.demo.training import RunResult


@dataclass(frozen=True)
class Metric:
    attribute: str  # of RunResult
    header: str
    digits: int
    lower_is_better: bool | None  # None: neither (a description, not a score)


METRICS = (
    Metric("accuracy", "test accuracy", 4, False),
    Metric("mean_confidence", "mean confidence", 4, None),
    Metric("nll", "NLL", 4, True),
    Metric("ece", "ECE", 4, True),
    Metric("temperature", "fitted T", 3, None),
    Metric("nll_scaled", "NLL at T", 4, True),
    Metric("ece_scaled", "ECE at T", 4, True),
    Metric("best_epoch", "best epoch", 1, None),
)
SCORES = tuple(metric for metric in METRICS if metric.lower_is_better is not None)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for a single seed

    def format(self, digits: int, signed: bool = False) -> str:
        mean = f"{self.mean:{'+' if signed else ''}.{digits}f}"
        return mean if self.std is None else f"{mean} ± {self.std:.{digits}f}"


def mean_std(values: Sequence[float]) -> MeanStd:
    if not values:
        raise ValueError("mean_std needs at least one value")
    return MeanStd(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


def runs_by_smoothing(runs: Sequence[RunResult]) -> dict[float, list[RunResult]]:
    """Runs grouped by label smoothing (in order of first appearance), each group sorted by seed."""
    groups: dict[float, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.label_smoothing, []).append(run)
    return {eps: sorted(group, key=lambda run: run.seed) for eps, group in groups.items()}


def summarize(runs: Sequence[RunResult]) -> dict[float, dict[str, MeanStd]]:
    """{label smoothing: {metric attribute: mean ± std over seeds}}."""
    return {
        eps: {metric.attribute: mean_std([float(getattr(run, metric.attribute)) for run in group]) for metric in METRICS}
        for eps, group in runs_by_smoothing(runs).items()
    }


@dataclass(frozen=True)
class PairedDifference:
    difference: MeanStd  # smoothed minus hard targets, over seeds
    better: int  # seeds where the smoothed run scored strictly better
    worse: int  # strictly worse
    seeds: int

    @property
    def tied(self) -> int:
        # Accuracy is a count of test images, so two runs can well get the same.
        return self.seeds - self.better - self.worse


def paired_differences(runs: Sequence[RunResult], hard: float, smoothed: float) -> dict[str, PairedDifference]:
    """Both runs of a seed share the data split, the noisy labels, the initial weights and the batch
    order, so their difference isolates the effect of smoothing; its spread over seeds is smaller
    than that of either run's metric."""
    groups = runs_by_smoothing(runs)
    pairs = list(zip(groups[hard], groups[smoothed]))
    mismatched = [(a.seed, b.seed) for a, b in pairs if a.seed != b.seed]
    if mismatched or len(groups[hard]) != len(groups[smoothed]):
        raise ValueError(f"every seed needs one run at eps={hard:g} and one at eps={smoothed:g}; mismatched: {mismatched}")
    result = {}
    for metric in SCORES:
        deltas = [float(getattr(b, metric.attribute)) - float(getattr(a, metric.attribute)) for a, b in pairs]
        sign = -1 if metric.lower_is_better else 1
        better = sum(sign * delta > 0 for delta in deltas)
        worse = sum(sign * delta < 0 for delta in deltas)
        result[metric.attribute] = PairedDifference(mean_std(deltas), better, worse, len(pairs))
    return result
