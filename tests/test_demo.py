import math
import re
import statistics
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from labelsmooth_ext.demo import main  # noqa: E402
from labelsmooth_ext.demo.cli import QUICK, build_parser  # noqa: E402
from labelsmooth_ext.demo.data import load_digits_splits  # noqa: E402
from labelsmooth_ext.demo.early_stopping import EarlyStopping  # noqa: E402
from labelsmooth_ext.demo.plots import save_timing_plot  # noqa: E402
from labelsmooth_ext.demo.report import timing_table  # noqa: E402
from labelsmooth_ext.demo.seed_summary import mean_std, paired_differences, summarize  # noqa: E402
from labelsmooth_ext.demo.timing import COMPILED, EAGER, OURS, default_implementations, time_all  # noqa: E402
from labelsmooth_ext.demo.training import RunResult, TrainingConfig, train_and_evaluate  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_SEED = 3  # the quick run uses seeds 3 and 4
PATIENCE = 10  # the demo's default --patience
# The report prints metrics with 4 decimals: each printed value is within this of the exact one.
PRINT_ROUNDING = 0.5e-4


def _cells(line):
    return [cell.strip() for cell in line.strip("|").split("|")]


def table_rows(markdown, first_header_cell):
    """Data rows (lists of cells) of the markdown table whose header starts with first_header_cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def table_dicts(markdown, first_header_cell):
    """The same rows as {column header: cell}."""
    header = next(line for line in markdown.splitlines() if line.startswith(f"| {first_header_cell} |"))
    return [dict(zip(_cells(header), row)) for row in table_rows(markdown, first_header_cell)]


def split_mean_std(cell):
    """'0.9431 ± 0.0216' -> (0.9431, 0.0216)."""
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


def seed_rows(report):
    """{(seed, label smoothing): {column header: cell}} from the report's per-run table."""
    return {(int(row["seed"]), float(row["label smoothing"])): row for row in table_dicts(report, "seed")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--quick", "--out", str(out), "--seed", str(QUICK_SEED)]) == 0
    return out


def test_quick_run_writes_report_and_figures(quick_run):
    for name in ("report.md", "reliability.png", "timing.png"):
        assert (quick_run / name).stat().st_size > 0
    for name in ("reliability.png", "timing.png"):
        assert (quick_run / name).read_bytes().startswith(PNG_SIGNATURE)
    report = (quick_run / "report.md").read_text()
    assert "](reliability.png)" in report and "](timing.png)" in report
    assert torch.__version__ in report and "backend:" in report


def test_report_states_the_method(quick_run):
    report = (quick_run / "report.md").read_text()
    method = report[report.index("### Method"):report.index("### Results")]
    last_seed = QUICK_SEED + QUICK["seeds"] - 1
    for statement in (
        "1078 train / 359 validation / 360 test images",
        "216 training labels (20%)",
        "validation and test labels are clean",
        f"stops once {PATIENCE} epochs in a row bring no lower one (or after {QUICK['epochs']} epochs)",
        "epoch with the lowest validation NLL",
        "minimising the NLL on the validation split",
        f"{QUICK['seeds']} seeds ({QUICK_SEED} to {last_seed})",
        f"reliability diagrams show seed {QUICK_SEED}",
    ):
        assert statement in method
    assert f"### Reliability diagrams (seed {QUICK_SEED})" in report


def test_report_numbers_are_finite_and_in_range(quick_run):
    report = (quick_run / "report.md").read_text()
    rows = seed_rows(report)
    assert sorted(rows) == [(seed, eps) for seed in range(QUICK_SEED, QUICK_SEED + QUICK["seeds"]) for eps in (0, 0.1)]
    for row in rows.values():
        for header in ("test accuracy", "mean confidence", "ECE", "ECE at T"):
            assert 0.0 <= float(row[header]) <= 1.0
        for header in ("validation NLL", "NLL", "fitted T", "NLL at T"):
            assert math.isfinite(float(row[header])) and float(row[header]) > 0

    timings = table_rows(report, "device")
    assert {row[2] for row in timings} == {OURS, EAGER, COMPILED}
    for row in timings:
        if row[2] == COMPILED and row[3].startswith("unavailable"):
            continue  # a machine without a C compiler
        milliseconds = float(row[3])
        assert math.isfinite(milliseconds) and milliseconds > 0


def test_report_summary_is_the_mean_and_std_of_the_seeds(quick_run):
    report = (quick_run / "report.md").read_text()
    rows = seed_rows(report)
    summary = {float(row["label smoothing"]): row for row in table_dicts(report, "label smoothing")}
    assert sorted(summary) == [0.0, 0.1]
    n = QUICK["seeds"]
    # The per-seed cells are rounded, so their mean and std are off by at most the rounding
    # (std moves by at most the l2 norm of the changes over sqrt(n - 1)); the summary cell is rounded too.
    mean_tolerance = 2 * PRINT_ROUNDING
    std_tolerance = PRINT_ROUNDING * math.sqrt(n / (n - 1)) + PRINT_ROUNDING
    for eps, summary_row in summary.items():
        assert summary_row["seeds"] == str(n)
        per_seed = [row for (seed, row_eps), row in rows.items() if row_eps == eps]
        for header in ("test accuracy", "mean confidence", "NLL", "ECE", "NLL at T", "ECE at T"):
            values = [float(row[header]) for row in per_seed]
            mean, std = split_mean_std(summary_row[header])
            assert abs(mean - statistics.fmean(values)) <= mean_tolerance, header
            assert abs(std - statistics.stdev(values)) <= std_tolerance, header
        epochs = [int(row["best epoch"]) for row in per_seed]
        mean, std = split_mean_std(summary_row["best epoch"])
        assert abs(mean - statistics.fmean(epochs)) <= 0.05 and abs(std - statistics.stdev(epochs)) <= 0.05


def test_report_differences_pair_the_runs_of_each_seed(quick_run):
    report = (quick_run / "report.md").read_text()
    rows = seed_rows(report)
    mean_row, count_row = table_dicts(report, "eps=0.1 minus eps=0, same seed")
    seeds = range(QUICK_SEED, QUICK_SEED + QUICK["seeds"])
    for header, lower_is_better in (("test accuracy", False), ("NLL", True), ("ECE", True),
                                    ("NLL at T", True), ("ECE at T", True)):
        deltas = [float(rows[seed, 0.1][header]) - float(rows[seed, 0.0][header]) for seed in seeds]
        mean, _ = split_mean_std(mean_row[header])
        assert abs(mean - statistics.fmean(deltas)) <= 3 * PRINT_ROUNDING, header
        better, worse, tied = (int(count) for count in count_row[header].split(" / "))
        assert better + worse + tied == len(deltas), header
        # Signs read from rounded cells are only certain away from zero.
        gains = [-delta if lower_is_better else delta for delta in deltas]
        assert better >= sum(gain > 2 * PRINT_ROUNDING for gain in gains), header
        assert worse >= sum(gain < -2 * PRINT_ROUNDING for gain in gains), header
        assert tied <= sum(abs(gain) <= 2 * PRINT_ROUNDING for gain in gains), header


def test_report_runs_follow_early_stopping(quick_run):
    for row in seed_rows((quick_run / "report.md").read_text()).values():
        best, trained = int(row["best epoch"]), int(row["epochs trained"])
        assert 1 <= best <= trained <= QUICK["epochs"]
        if trained < QUICK["epochs"]:
            # It stopped early: exactly `patience` epochs after its best one.
            assert trained - best == PATIENCE


def test_same_seed_gives_same_metrics(tmp_path):
    def metrics(out):
        arguments = ["--skip-timing", "--seeds", "2", "--epochs", "3", "--seed", "7", "--out", str(out)]
        assert main(arguments) == 0
        # The last column is the training time, which varies.
        return [row[:-1] for row in table_rows((out / "report.md").read_text(), "seed")]

    first = metrics(tmp_path / "a")
    assert first == metrics(tmp_path / "b")
    assert [row[0] for row in first] == ["7", "7", "8", "8"]
    # Different seeds see different data and weights, so their metrics differ.
    assert first[0][4:] != first[2][4:]


def test_skip_timing_removes_a_stale_timing_picture(tmp_path):
    stale = tmp_path / "timing.png"
    stale.write_bytes(PNG_SIGNATURE + b"from an earlier run")
    assert main(["--skip-timing", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path)]) == 0
    assert not stale.exists()
    report = (tmp_path / "report.md").read_text()
    assert "timing.png" not in report and "## Speed" not in report
    assert (tmp_path / "reliability.png").read_bytes().startswith(PNG_SIGNATURE)
    # One seed: means without a standard deviation, never a made-up one.
    summary = table_rows(report, "label smoothing")
    assert all("±" not in cell for row in summary for cell in row)


def test_early_stopping_restores_the_best_epoch_and_stops_after_patience():
    model = torch.nn.Linear(3, 2)
    stopping = EarlyStopping(patience=2)
    history = [0.9, 0.5, float("nan"), 0.7, 0.4, 0.4, 0.6]
    stopped_at = None
    for epoch, val_nll in enumerate(history, start=1):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(epoch)  # in place, as an optimizer step is
        stopping.update(epoch, val_nll, model)
        if stopping.should_stop:
            stopped_at = epoch
            break
    # 0.5 at epoch 2; NaN and 0.7 are no better, so epochs 3 and 4 exhaust a patience of 2.
    assert stopped_at == 4 and stopping.best_epoch == 2 and stopping.best_val_nll == 0.5
    stopping.restore(model)
    assert all(bool((parameter == 2).all()) for parameter in model.parameters())

    stopping = EarlyStopping(patience=3)
    for epoch, val_nll in enumerate([0.8, 0.4, 0.4, 0.6], start=1):
        stopping.update(epoch, val_nll, model)
    # A tie is no improvement: the first epoch to reach the value stays the best.
    assert stopping.best_epoch == 2 and stopping.epochs_since_best == 2 and not stopping.should_stop


def test_early_stopping_errors():
    with pytest.raises(ValueError, match="patience must be a positive integer, got 0"):
        EarlyStopping(0)
    stopping = EarlyStopping(1)
    stopping.update(1, float("nan"), torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no epoch had a finite validation NLL"):
        stopping.restore(torch.nn.Linear(2, 2))


def test_training_evaluates_the_epoch_with_the_lowest_validation_nll(gen):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    splits = load_digits_splits(0.2, seed)
    # A patience of 1 stops at the first epoch that does not improve, so the evaluated weights are
    # never the last ones trained: returning the last model would be caught. With 20% of the
    # labels wrong, the validation NLL rises long before 40 epochs.
    config = TrainingConfig(max_epochs=40, patience=1, hidden=64, batch_size=32, learning_rate=2e-3, n_bins=10,
                            seed=seed)
    run = train_and_evaluate(splits, 0.1, config, lambda line: None)
    history = run.val_nll_history
    assert run.epochs_trained == len(history) < config.max_epochs
    assert run.best_epoch == min(range(1, len(history) + 1), key=lambda epoch: history[epoch - 1])
    assert run.best_epoch == run.epochs_trained - 1 and history[-1] >= history[-2]
    # Measured again on the restored weights: the same computation on the same bits.
    assert run.val_nll == history[run.best_epoch - 1]


def fake_run(seed, eps, **metrics):
    values = dict(accuracy=0.9, mean_confidence=0.8, nll=0.4, ece=0.1, temperature=1.0, nll_scaled=0.3,
                  ece_scaled=0.05)
    values.update(metrics)
    return RunResult(seed=seed, label_smoothing=eps, best_epoch=5, epochs_trained=15, val_nll_history=(0.5,) * 15,
                     val_nll=0.5, train_seconds=1.0, test_logits=torch.zeros(1, 10), **values)


def test_seed_summary_and_paired_differences(gen):
    accuracy = torch.rand(2, 4, generator=gen, dtype=torch.float64).tolist()
    nll = torch.rand(2, 4, generator=gen, dtype=torch.float64).tolist()
    runs = [fake_run(seed, eps, accuracy=accuracy[i][seed], nll=nll[i][seed])
            for seed in (3, 1, 2, 0) for i, eps in enumerate((0.0, 0.2))]
    summary = summarize(runs)
    assert list(summary) == [0.0, 0.2]
    for i, eps in enumerate((0.0, 0.2)):
        assert summary[eps]["accuracy"].mean == pytest.approx(statistics.fmean(accuracy[i]), rel=1e-12)
        assert summary[eps]["nll"].std == pytest.approx(statistics.stdev(nll[i]), rel=1e-12)
        assert summary[eps]["ece"].std == 0.0

    differences = paired_differences(runs, 0.0, 0.2)
    accuracy_gain = [b - a for a, b in zip(*accuracy)]
    nll_change = [b - a for a, b in zip(*nll)]
    assert differences["accuracy"].difference.mean == pytest.approx(statistics.fmean(accuracy_gain), rel=1e-12)
    # Higher accuracy is better, lower NLL is better.
    assert differences["accuracy"].better == sum(delta > 0 for delta in accuracy_gain)
    assert differences["accuracy"].worse == sum(delta < 0 for delta in accuracy_gain)
    assert differences["nll"].better == sum(delta < 0 for delta in nll_change)
    assert differences["nll"].worse == sum(delta > 0 for delta in nll_change)
    assert differences["nll"].seeds == 4 and "mean_confidence" not in differences
    # Equal ECE in every pair: all ties.
    assert (differences["ece"].better, differences["ece"].worse, differences["ece"].tied) == (0, 0, 4)

    with pytest.raises(ValueError, match="every seed needs one run at eps=0 and one at eps=0.2"):
        paired_differences(runs[:-1], 0.0, 0.2)
    assert mean_std([0.25]).format(3) == "0.250"
    assert mean_std([0.25, -0.75]).format(2, signed=True) == "-0.25 ± 0.71"


def test_torch_compile_failure_is_reported_not_raised(monkeypatch, tmp_path):
    def compile_without_compiler(fn, *args, **kwargs):
        def fails(*args, **kwargs):
            raise RuntimeError("no C compiler found\nsecond line")

        return fails

    monkeypatch.setattr(torch, "compile", compile_without_compiler)
    timings = time_all([(16, 5)], repeats=2, label_smoothing=0.1, seed=0, log=lambda line: None)

    by_name = {t.implementation: t for t in timings}
    assert by_name[COMPILED].median_ms is None
    assert by_name[COMPILED].note == "unavailable: RuntimeError: no C compiler found"
    assert by_name[OURS].median_ms > 0 and by_name[EAGER].median_ms > 0
    assert "unavailable: RuntimeError: no C compiler found" in timing_table(timings)
    save_timing_plot(timings, tmp_path / "timing.png")
    assert (tmp_path / "timing.png").read_bytes().startswith(PNG_SIGNATURE)


def test_torch_compile_failing_to_build_is_reported_not_raised(monkeypatch):
    implementations = default_implementations()

    def unsupported():
        raise RuntimeError("torch.compile is not supported on this Python")

    implementations[COMPILED] = unsupported
    timings = time_all([(8, 3)], 1, 0.1, 0, lambda line: None, implementations)
    assert [t.implementation for t in timings] == [OURS, EAGER, COMPILED]
    assert timings[2].note.startswith("unavailable: RuntimeError: torch.compile is not supported")


def test_help_and_readme_document_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    readme = README.read_text()
    demo_section = readme[readme.index("## The demo"):]
    demo_section = demo_section[:demo_section.index("\n## ", 1)]
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in help_text
            if option not in ("-h", "--help"):
                assert f"`{option}`" in demo_section, f"README's demo section does not mention {option}"
        assert action.help


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--noise", "1"], "argument --noise: expected a number in [0, 1), got 1"),
        (["--smoothing", "0"], "argument --smoothing: expected a number in (0, 1], got 0"),
        (["--epochs", "zero"], "argument --epochs: expected a positive integer, got 'zero'"),
        (["--shapes", "4096x"], "argument --shapes: expected comma-separated ROWSxCLASSES"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**32), got '-1'"),
        (["--seeds", "0"], "argument --seeds: expected a positive integer, got 0"),
        (["--seed", str(2**32 - 2), "--seeds", "3"], f"argument --seeds: seeds {2**32 - 2}..{2**32} go past"),
        (["--patience", "1.5"], "argument --patience: expected a positive integer, got '1.5'"),
        (["--lr", "0"], "argument --lr: expected a positive number, got 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_with_a_clear_error(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path, capsys):
    a_file = tmp_path / "report"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        main(["--out", str(a_file)])
    assert re.search(r"argument --out: .* exists and is not a directory", capsys.readouterr().err)
