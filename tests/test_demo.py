import math
import re

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from labelsmooth_ext.demo import main  # noqa: E402
from labelsmooth_ext.demo.cli import build_parser  # noqa: E402
from labelsmooth_ext.demo.plots import save_timing_plot  # noqa: E402
from labelsmooth_ext.demo.report import timing_table  # noqa: E402
from labelsmooth_ext.demo.timing import COMPILED, EAGER, OURS, default_implementations, time_all  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_rows(markdown, first_header_cell):
    """Data rows (lists of cells) of the markdown table whose header starts with first_header_cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--quick", "--out", str(out), "--seed", "3"]) == 0
    return out


def test_quick_run_writes_report_and_figures(quick_run):
    for name in ("report.md", "reliability.png", "timing.png"):
        assert (quick_run / name).stat().st_size > 0
    for name in ("reliability.png", "timing.png"):
        assert (quick_run / name).read_bytes().startswith(PNG_SIGNATURE)
    report = (quick_run / "report.md").read_text()
    assert "](reliability.png)" in report and "](timing.png)" in report
    assert torch.__version__ in report and "backend:" in report


def test_quick_run_report_numbers_are_finite_and_in_range(quick_run):
    report = (quick_run / "report.md").read_text()

    calibration = table_rows(report, "label smoothing")
    assert [row[0] for row in calibration] == ["0", "0.1"]
    for row in calibration:
        accuracy, confidence, nll, ece, temperature, nll_scaled, ece_scaled = map(float, row[1:8])
        for value in (accuracy, confidence, ece, ece_scaled):
            assert 0.0 <= value <= 1.0
        for value in (nll, temperature, nll_scaled):
            assert math.isfinite(value) and value > 0

    timings = table_rows(report, "device")
    assert {row[2] for row in timings} == {OURS, EAGER, COMPILED}
    for row in timings:
        if row[2] == COMPILED and row[3].startswith("unavailable"):
            continue  # a machine without a C compiler
        milliseconds = float(row[3])
        assert math.isfinite(milliseconds) and milliseconds > 0


def test_same_seed_gives_same_metrics(tmp_path):
    def metrics(out):
        arguments = ["--skip-timing", "--epochs", "3", "--seed", "7", "--out", str(out)]
        assert main(arguments) == 0
        # The last column is the training time, which varies.
        return [row[:-1] for row in table_rows((out / "report.md").read_text(), "label smoothing")]

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert not (tmp_path / "a" / "timing.png").exists()


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


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in help_text
        assert action.help


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--noise", "1"], "argument --noise: expected a number in [0, 1), got 1"),
        (["--smoothing", "0"], "argument --smoothing: expected a number in (0, 1], got 0"),
        (["--epochs", "zero"], "argument --epochs: expected a positive integer, got 'zero'"),
        (["--shapes", "4096x"], "argument --shapes: expected comma-separated ROWSxCLASSES"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**32), got '-1'"),
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
