"""How setup.py and CMakeLists.txt find the CUDA toolkit (tools/cuda_toolkit.py), on fake toolkits and
fake nvcc wrappers in temporary directories, plus the real nvcc of this machine when it has one."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import cuda_toolkit  # noqa: E402

NOWHERE = ()  # no conventional location, so a test sees only the candidates it makes


def write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_toolkit(root: Path, answers_dryrun: bool = True) -> Path:
    """A directory shaped like a toolkit; its nvcc prints the `TOP=` line real nvcc prints on -v --dryrun."""
    (root / "include").mkdir(parents=True)
    (root / cuda_toolkit.RUNTIME_HEADER).write_text("/* fake */\n")
    here = root / "bin"
    body = f'echo "#\\$ TOP={here}/.." >&2\n' if answers_dryrun else "exit 1\n"
    write_script(here / "nvcc", "#!/bin/sh\n" + body)
    return root


def environ(**variables) -> dict:
    return {"PATH": variables.pop("PATH", "")} | variables


def test_cuda_home_is_taken_when_it_is_a_toolkit(tmp_path):
    home = fake_toolkit(tmp_path / "cuda")
    search = cuda_toolkit.find_cuda_toolkit(environ(CUDA_HOME=str(home)), NOWHERE)
    assert search.home == home and search.tried == []


def test_cuda_home_without_the_runtime_header_is_reported_and_skipped(tmp_path):
    broken = tmp_path / "broken"
    (broken / "bin").mkdir(parents=True)
    home = fake_toolkit(tmp_path / "cuda")
    search = cuda_toolkit.find_cuda_toolkit(environ(CUDA_HOME=str(broken), CUDA_PATH=str(home)), NOWHERE)
    assert search.home == home
    assert search.tried == [("$CUDA_HOME", str(broken), f"no {cuda_toolkit.RUNTIME_HEADER} in it")]


def test_nvcc_symlink_on_path_resolves_to_its_toolkit(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    search = cuda_toolkit.find_cuda_toolkit(environ(PATH=str(tmp_path / "bin")), NOWHERE)
    assert search.home == home


def test_nvcc_wrapper_script_on_path_gives_the_toolkit_nvcc_reports(tmp_path):
    home = fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    wrapper = write_script(tmp_path / "usr" / "bin" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    search = cuda_toolkit.find_cuda_toolkit(environ(PATH=str(wrapper.parent)), NOWHERE)
    assert search.home == home
    # The wrapper's own parent was looked at first and rejected, with the reason.
    assert search.tried == [(f"nvcc on PATH ({wrapper})", str(tmp_path / "usr"), f"no {cuda_toolkit.RUNTIME_HEADER} in it")]


@pytest.mark.parametrize("quote", ["", '"', "'"])
def test_wrapper_whose_nvcc_cannot_run_falls_back_to_its_exec_line(tmp_path, quote):
    name = "cuda 13.0" if quote else "cuda-13.0"  # a quoted exec line may name a path with spaces
    home = fake_toolkit(tmp_path / "opt" / name, answers_dryrun=False)
    wrapper = write_script(tmp_path / "usr" / "bin" / "nvcc",
                           f'#!/bin/sh\n# runs the toolkit\'s nvcc\n  exec {quote}{home}/bin/nvcc{quote} "$@"\n')
    search = cuda_toolkit.find_cuda_toolkit(environ(PATH=str(wrapper.parent)), NOWHERE)
    assert search.home == home
    assert [origin for origin, _, _ in search.tried] == [f"nvcc on PATH ({wrapper})"]


def test_conventional_location_is_the_last_resort(tmp_path):
    home = fake_toolkit(tmp_path / "usr-local-cuda")
    search = cuda_toolkit.find_cuda_toolkit(environ(CUDA_HOME=str(tmp_path / "missing")), (home,))
    assert search.home == home
    assert search.tried == [("$CUDA_HOME", str(tmp_path / "missing"), "no such directory")]


def test_nothing_found_lists_every_candidate(tmp_path):
    wrapper = write_script(tmp_path / "bin" / "nvcc", "#!/bin/sh\nexit 1\n")
    search = cuda_toolkit.find_cuda_toolkit(environ(PATH=str(wrapper.parent), CUDA_PATH=str(tmp_path / "nope")),
                                            (tmp_path / "cuda",))
    assert search.home is None
    assert [origin for origin, _, _ in search.tried] == ["$CUDA_PATH", f"nvcc on PATH ({wrapper})", "conventional location"]
    assert [reason for _, _, reason in search.tried] == [
        "no such directory", f"no {cuda_toolkit.RUNTIME_HEADER} in it", "no such directory"]
    text = search.describe_tried()
    assert str(tmp_path / "nope") in text and str(tmp_path / "cuda") in text


def test_cuda_torch_without_toolkit_builds_cpu_only_and_says_why(tmp_path):
    messages = []
    env = environ(CUDA_HOME=str(tmp_path / "missing"))
    assert cuda_toolkit.cuda_build_toolkit("13.0", env, log=messages.append, conventional=NOWHERE) is None
    (message,) = messages
    assert "torch has CUDA 13.0" in message and str(tmp_path / "missing") in message
    assert "building the CPU kernels only" in message


def test_cuda_requested_without_toolkit_is_an_error(tmp_path):
    env = environ(CUDA_HOME=str(tmp_path / "missing"), LABELSMOOTH_FORCE_CUDA="1")
    with pytest.raises(RuntimeError, match=r"(?s)LABELSMOOTH_FORCE_CUDA=1 asks for the CUDA kernels, but torch has CUDA 13.0.*missing"):
        cuda_toolkit.cuda_build_toolkit("13.0", env, log=lambda _: None, conventional=NOWHERE)
    with pytest.raises(RuntimeError, match="no CUDA support"):
        cuda_toolkit.cuda_build_toolkit(None, env, log=lambda _: None)


def test_force_cpu_skips_the_search_and_contradicts_force_cuda(tmp_path):
    home = fake_toolkit(tmp_path / "cuda")
    assert cuda_toolkit.cuda_build_toolkit("13.0", environ(CUDA_HOME=str(home), LABELSMOOTH_FORCE_CPU="1")) is None
    with pytest.raises(RuntimeError, match="contradict"):
        cuda_toolkit.cuda_build_toolkit("13.0", environ(LABELSMOOTH_FORCE_CPU="1", LABELSMOOTH_FORCE_CUDA="1"))
    found = []
    assert cuda_toolkit.cuda_build_toolkit("13.0", environ(CUDA_HOME=str(home)), log=found.append) == home
    assert str(home) in found[0]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_the_script_finds_this_machines_toolkit():
    """Whatever the nvcc on PATH is (the toolkit's own, a symlink, a wrapper), its toolkit is found."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_toolkit.py")], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    home = Path(result.stdout.strip())
    assert (home / cuda_toolkit.RUNTIME_HEADER).is_file()
    nvcc_version = subprocess.run([shutil.which("nvcc"), "--version"], capture_output=True, text=True).stdout
    assert nvcc_version == subprocess.run([home / "bin" / "nvcc", "--version"], capture_output=True, text=True).stdout
