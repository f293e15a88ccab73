"""Calibration metrics for classifiers: expected calibration error, reliability diagrams and
post-hoc temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017).

All functions take a 2-D ``(N, C)`` tensor of scores and a 1-D tensor of ``N`` class indices in
``[0, C)``. Scores may be logits or probabilities, see :func:`reliability_diagram` for how they
are told apart. Every statistic is computed in float64, so results do not depend on the input
dtype beyond its own rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ReliabilityDiagram",
    "expected_calibration_error",
    "reliability_diagram",
    "fit_temperature",
]


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin calibration data over equal-width confidence bins.

    Bin ``b`` holds the samples whose confidence (largest class probability) lies in
    ``(bin_edges[b], bin_edges[b + 1]]``. ``accuracy`` and ``confidence`` are the mean correctness
    and mean confidence of those samples, NaN for empty bins; ``counts`` is how many there are.
    """

    bin_edges: torch.Tensor  # (n_bins + 1,) float64, 0 ... 1
    accuracy: torch.Tensor  # (n_bins,) float64
    confidence: torch.Tensor  # (n_bins,) float64
    counts: torch.Tensor  # (n_bins,) int64

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - confidence| weighted by the
        fraction of samples in the bin."""
        total = int(self.counts.sum())
        occupied = self.counts > 0
        gaps = (self.accuracy[occupied] - self.confidence[occupied]).abs()
        return float((gaps * self.counts[occupied]).sum() / total)


def expected_calibration_error(
    logits_or_probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    *,
    from_logits: bool | None = None,
) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins, each bin weighted by
    its sample count. 0 is perfectly calibrated; the worst case is 1.

    ``from_logits``: True for logits, False for probabilities, None to detect which (see
    :func:`reliability_diagram`).
    """
    return reliability_diagram(logits_or_probs, target, n_bins, from_logits=from_logits).ece


def reliability_diagram(
    logits_or_probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    *,
    from_logits: bool | None = None,
) -> ReliabilityDiagram:
    """Per-bin accuracy, confidence and counts over ``n_bins`` equal-width bins on [0, 1].

    ``from_logits=None`` treats the scores as probabilities when every value lies in [0, 1] and
    every row sums to 1 (to within ``max(1e-3, 2 * finfo(dtype).eps)``), and as logits otherwise.
    Logits that happen to look like probabilities are read as probabilities; pass
    ``from_logits=True`` to rule that out.
    """
    n_bins = _check_n_bins(n_bins)
    probs = _probabilities(logits_or_probs, from_logits)
    target = _check_target(target, probs)

    confidence, prediction = probs.max(dim=1)
    correct = (prediction == target).to(torch.float64)
    bin_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # right=False on the inner edges puts a confidence equal to an edge into the lower bin, which
    # gives the (lower, upper] bins of the definition; confidence is >= 1/C > 0, so none is lost.
    bin_index = torch.bucketize(confidence, bin_edges[1:-1], right=False)

    counts = torch.bincount(bin_index, minlength=n_bins)
    occupied = counts.to(torch.float64)
    accuracy = torch.bincount(bin_index, weights=correct, minlength=n_bins) / occupied
    mean_confidence = torch.bincount(bin_index, weights=confidence, minlength=n_bins) / occupied
    return ReliabilityDiagram(bin_edges, accuracy, mean_confidence, counts)


def fit_temperature(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    bounds: tuple[float, float] = (0.01, 100.0),
) -> float:
    """Temperature ``T`` in ``bounds`` minimising the mean NLL of ``softmax(logits / T)``.

    Fit it on held-out data, then divide the logits by it at test time: it changes confidence,
    never the predicted class. The NLL is convex in the inverse temperature ``b = 1/T`` with
    derivative ``mean(E_softmax(b z)[z] - z_target)``, so bisecting on the sign of that derivative
    finds the minimum to float64 precision deterministically, with no learning rate or start
    point to tune. Returns a bound when the minimum lies beyond it (for instance the lower bound
    when every training prediction is right and sharper always lowers the NLL).
    """
    t_low, t_high = _check_bounds(bounds)
    z = _check_scores(logits, "logits").to(torch.float64)
    target = _check_target(target, z)
    z_target = z.gather(1, target.unsqueeze(1)).squeeze(1)

    def nll_slope(inverse_temperature: float) -> float:
        p = torch.softmax(z * inverse_temperature, dim=1)
        return float(((p * z).sum(dim=1) - z_target).mean())

    b_low, b_high = 1.0 / t_high, 1.0 / t_low
    if nll_slope(b_low) >= 0.0:
        return t_high
    if nll_slope(b_high) <= 0.0:
        return t_low
    # Bisect in log space so the result has the same relative precision at every scale.
    log_low, log_high = math.log(b_low), math.log(b_high)
    while log_high - log_low > 1e-12:
        log_mid = 0.5 * (log_low + log_high)
        if nll_slope(math.exp(log_mid)) < 0.0:
            log_low = log_mid
        else:
            log_high = log_mid
    return 1.0 / math.exp(0.5 * (log_low + log_high))


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return n_bins


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        t_low, t_high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be two numbers (low, high), got {bounds!r}") from None
    if not (0.0 < t_low < t_high < math.inf):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
    return t_low, t_high


def _check_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one class, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {scores.dtype}")
    scores = scores.detach().cpu()
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        row, col = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"{name} must be finite, got {float(scores[row, col])} at [{row}, {col}]")
    return scores


def _probabilities(logits_or_probs: torch.Tensor, from_logits: bool | None) -> torch.Tensor:
    if from_logits not in (True, False, None):
        raise ValueError(f"from_logits must be True, False or None, got {from_logits!r}")
    scores = _check_scores(logits_or_probs, "logits_or_probs")
    dtype = scores.dtype
    scores = scores.to(torch.float64)
    if from_logits:
        return torch.softmax(scores, dim=1)

    tolerance = max(1e-3, 2 * torch.finfo(dtype).eps)
    row_error = (scores.sum(dim=1) - 1.0).abs()
    in_unit_interval = bool(((scores >= 0) & (scores <= 1)).all())
    if in_unit_interval and bool((row_error <= tolerance).all()):
        return scores
    if from_logits is None:
        return torch.softmax(scores, dim=1)
    if not in_unit_interval:
        row, col = (int(i) for i in ((scores < 0) | (scores > 1)).nonzero()[0])
        raise ValueError(
            f"from_logits=False but logits_or_probs[{row}, {col}] = {float(scores[row, col])} "
            "is not a probability in [0, 1]"
        )
    row = int(row_error.argmax())
    raise ValueError(
        f"from_logits=False but row {row} of logits_or_probs sums to {float(scores[row].sum())}, "
        f"not 1 (tolerance {tolerance:g})"
    )


def _check_target(target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    n_rows, n_classes = scores.shape
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(
            f"target must have shape ({n_rows},) to match {n_rows} rows of scores, got shape {tuple(target.shape)}"
        )
    target = target.detach().cpu().to(torch.int64)
    out_of_range = (target < 0) | (target >= n_classes)
    if bool(out_of_range.any()):
        index = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"target[{index}] = {int(target[index])} is not a class index in [0, {n_classes})"
        )
    return target
