import math

import pytest
import torch

from labelsmooth_ext.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
)

# Five samples, three classes, four bins with exactly representable edges 0, .25, .5, .75, 1.
#   row  probabilities        target  confidence  correct  bin (lower, upper]
#   0    .9   .05  .05        0       .9          yes      3
#   1    .6   .3   .1         1       .6          no       2
#   2    .1   .8   .1         1       .8          yes      3
#   3    .5   .25  .25        0       .5          yes      1   (on the edge .5: the lower bin)
#   4    .2   .2   .6         2       .6          yes      2
# bin 0: empty; bin 1: 1 sample, accuracy 1, confidence .5;
# bin 2: 2 samples, accuracy .5, confidence .6; bin 3: 2 samples, accuracy 1, confidence .85.
# ECE = 1/5 * |1 - .5| + 2/5 * |.5 - .6| + 2/5 * |1 - .85| = .1 + .04 + .06 = .2
HAND_PROBS = torch.tensor(
    [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]],
    dtype=torch.float64,
)
HAND_TARGET = torch.tensor([0, 1, 1, 0, 2])
HAND_ECE = 0.2


def test_reliability_diagram_matches_hand_computed_bins():
    bins = reliability_diagram(HAND_PROBS, HAND_TARGET, n_bins=4)
    torch.testing.assert_close(bins.bin_edges, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert bins.counts.tolist() == [0, 1, 2, 2]
    assert math.isnan(bins.accuracy[0]) and math.isnan(bins.confidence[0])
    torch.testing.assert_close(bins.accuracy[1:], torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(bins.confidence[1:], torch.tensor([0.5, 0.6, 0.85], dtype=torch.float64))
    assert bins.ece == pytest.approx(HAND_ECE, abs=1e-12)


def test_ece_matches_hand_computed_value_from_probs_and_from_logits():
    assert expected_calibration_error(HAND_PROBS, HAND_TARGET, n_bins=4) == pytest.approx(HAND_ECE, abs=1e-12)
    # Any per-row shift of log-probabilities is a set of logits with the same softmax.
    logits = HAND_PROBS.log() + torch.tensor([[3.0], [-1.0], [0.5], [7.0], [-2.0]], dtype=torch.float64)
    assert expected_calibration_error(logits, HAND_TARGET, n_bins=4) == pytest.approx(HAND_ECE, abs=1e-12)
    assert expected_calibration_error(logits, HAND_TARGET, n_bins=4, from_logits=True) == pytest.approx(
        HAND_ECE, abs=1e-12
    )


def test_ece_extremes():
    # Confidence 1 everywhere: all right gives 0, all wrong gives 1 (one bin, gap 1).
    one_hot = torch.eye(4)
    assert expected_calibration_error(one_hot, torch.arange(4)) == 0.0
    assert expected_calibration_error(one_hot, (torch.arange(4) + 1) % 4) == 1.0


def test_auto_detection_reads_low_precision_probabilities_as_probabilities():
    logits = torch.randn(64, 7, dtype=torch.float64) * 2
    target = torch.randint(0, 7, (64,))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # Rounded to dtype, the rows no longer sum to exactly 1; detection must allow for that.
        probs = logits.softmax(dim=1).to(dtype)
        detected = reliability_diagram(probs, target)
        as_probs = reliability_diagram(probs, target, from_logits=False)
        as_logits = reliability_diagram(probs, target, from_logits=True)
        torch.testing.assert_close(detected.confidence, as_probs.confidence, equal_nan=True, rtol=0, atol=0)
        assert not torch.allclose(detected.confidence, as_logits.confidence, equal_nan=True)


def test_from_logits_true_applies_softmax_even_to_probability_like_scores():
    # Read as logits, [1, 0] gives softmax confidence e/(1+e) ~ .731 in bin 2 of 3, correct.
    scores = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([0])
    assert expected_calibration_error(scores, target, n_bins=3) == 0.0
    assert expected_calibration_error(scores, target, n_bins=3, from_logits=True) == pytest.approx(
        1 - math.e / (1 + math.e)
    )


def test_fit_temperature_hand_computed():
    # Rows [2, 0] with targets 0, 0, 0, 1: NLL slope in b = 1/T is mean(E_p[z] - z_y)
    # = 2 sigmoid(2b) - 2 * 3/4, zero at sigmoid(2b) = 3/4, i.e. b = ln(3)/2, T = 2/ln 3.
    logits = torch.tensor([[2.0, 0.0]] * 4)
    target = torch.tensor([0, 0, 0, 1])
    assert fit_temperature(logits, target) == pytest.approx(2 / math.log(3), rel=1e-9)


def test_fit_temperature_returns_a_bound_when_the_minimum_lies_beyond_it():
    # Always right: sharper always lowers the NLL. Half right with equal logit gaps: the minimum is
    # at b = 0 (uniform predictions), T = infinity.
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert fit_temperature(logits, torch.tensor([0, 1]), bounds=(0.5, 4.0)) == 0.5
    assert fit_temperature(logits, torch.tensor([0, 0]), bounds=(0.5, 4.0)) == 4.0


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    generator = torch.Generator().manual_seed(torch.seed() % 2**32)
    n, classes, true_temperature = 20000, 10, 2.5
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 4
    target = torch.multinomial((logits / true_temperature).softmax(dim=1), 1, generator=generator).squeeze(1)

    fitted = fit_temperature(logits, target)

    # Maximum likelihood in b = 1/T: Fisher information per sample is Var_p(z) at the true b,
    # so the standard error of b is 1/sqrt(sum Var_p(z)); the relative error of T equals b's.
    p = (logits / true_temperature).softmax(dim=1)
    variance = (p * logits**2).sum(dim=1) - (p * logits).sum(dim=1) ** 2
    relative_standard_error = float(true_temperature / variance.sum().sqrt())
    assert fitted == pytest.approx(true_temperature, rel=5 * relative_standard_error)


def test_fit_temperature_minimises_the_nll():
    logits = torch.randn(500, 5) * 3
    target = torch.multinomial((logits / 1.7).softmax(dim=1), 1).squeeze(1)
    fitted = fit_temperature(logits, target)

    def nll(temperature):
        return float(torch.nn.functional.cross_entropy(logits.double() / temperature, target))

    assert nll(fitted) <= min(nll(fitted * 0.999), nll(fitted * 1.001))


BAD_INPUTS = [
    (dict(logits_or_probs=torch.randn(3)), ValueError, "must be 2-D"),
    (dict(logits_or_probs=torch.randn(0, 3), target=torch.zeros(0, dtype=torch.long)), ValueError, "at least one row"),
    (dict(logits_or_probs=torch.ones(3, 4, dtype=torch.long)), TypeError, "floating point"),
    (dict(logits_or_probs=[[0.5, 0.5]]), TypeError, "torch.Tensor, got list"),
    (dict(logits_or_probs=torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [0.0, 0.0]])), ValueError, "nan at \\[1, 0\\]"),
    (dict(target=torch.tensor([0, 1])), ValueError, "shape \\(3,\\)"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer class indices"),
    (dict(target=torch.tensor([0, 1, 7])), ValueError, "target\\[2\\] = 7 is not a class index in \\[0, 4\\)"),
    (dict(target=torch.tensor([0, -1, 2])), ValueError, "target\\[1\\] = -1"),
    (dict(n_bins=0), ValueError, "n_bins must be a positive integer, got 0"),
    (dict(n_bins=2.5), ValueError, "got 2.5"),
    (dict(n_bins=True), ValueError, "got True"),
    (dict(from_logits="yes"), ValueError, "from_logits must be True, False or None, got 'yes'"),
    (dict(logits_or_probs=torch.tensor([[1.5, -0.5]] * 3), from_logits=False), ValueError, "\\[0, 0\\] = 1.5"),
    (dict(logits_or_probs=torch.tensor([[0.5, 0.4]] * 3), from_logits=False), ValueError, "sums to 0.9"),
]


@pytest.mark.parametrize("function", [expected_calibration_error, reliability_diagram])
@pytest.mark.parametrize("override, error, message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_value(function, override, error, message):
    arguments = dict(logits_or_probs=torch.randn(3, 4), target=torch.tensor([0, 1, 2]), n_bins=15)
    arguments.update(override)
    with pytest.raises(error, match=message):
        function(**arguments)


@pytest.mark.parametrize(
    "override, error, message",
    [
        (dict(logits=torch.randn(3)), ValueError, "logits must be 2-D"),
        (dict(logits=torch.tensor([[0.0, float("inf")]] * 3)), ValueError, "inf at \\[0, 1\\]"),
        (dict(target=torch.tensor([0, 1, 4])), ValueError, "target\\[2\\] = 4"),
        (dict(bounds=(0.0, 1.0)), ValueError, "0 < low < high < inf, got \\(0.0, 1.0\\)"),
        (dict(bounds=(2.0, 1.0)), ValueError, "got \\(2.0, 1.0\\)"),
        (dict(bounds=(1.0, float("inf"))), ValueError, "got \\(1.0, inf\\)"),
        (dict(bounds="ab"), ValueError, "two numbers"),
        (dict(bounds=(1.0, 2.0, 3.0)), ValueError, "two numbers"),
    ],
)
def test_fit_temperature_bad_inputs(override, error, message):
    arguments = dict(logits=torch.randn(3, 4), target=torch.tensor([0, 1, 2]))
    arguments.update(override)
    with pytest.raises(error, match=message):
        fit_temperature(**arguments)
