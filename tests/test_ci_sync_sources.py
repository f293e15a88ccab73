"""The CUDA build job's source copy (.ci/sync_sources.py) rewrites only changed files, so its cached build
stays incremental although CI clones afresh; files gone from the tree go from the copy, build outputs stay."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "sync_sources.py"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def sync(source, destination):
    subprocess.run([sys.executable, str(SCRIPT), str(source), str(destination)], check=True, capture_output=True)


def test_only_changed_files_are_written(tmp_path):
    source, copy = tmp_path / "source", tmp_path / "copy"
    (source / "csrc").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    (source / ".gitignore").write_text("build/\n")
    (source / "csrc" / "kept.cpp").write_text("int kept;\n")
    (source / "csrc" / "edited.cpp").write_text("int edited;\n")
    (source / "csrc" / "removed.cpp").write_text("int removed;\n")
    (source / "build").mkdir()
    (source / "build" / "ignored.o").write_text("object")
    sync(source, copy)
    assert (copy / "csrc" / "kept.cpp").read_text() == "int kept;\n"
    assert not (copy / "build").exists()  # ignored files are not sources
    (copy / "build").mkdir()
    (copy / "build" / "output.o").write_text("cached build output")
    old = 1_000_000_000  # mark the copies as old, as after an earlier CI run
    for name in ("kept.cpp", "edited.cpp"):
        os.utime(copy / "csrc" / name, (old, old))

    # A fresh clone: every source file gets a new timestamp, one changes, one is deleted.
    for path in (source / "csrc").iterdir():
        path.touch()
    (source / "csrc" / "edited.cpp").write_text("int edited = 1;\n")
    (source / "csrc" / "removed.cpp").unlink()
    sync(source, copy)

    assert (copy / "csrc" / "kept.cpp").stat().st_mtime == old
    assert (copy / "csrc" / "edited.cpp").read_text() == "int edited = 1;\n"
    assert (copy / "csrc" / "edited.cpp").stat().st_mtime > old
    assert not (copy / "csrc" / "removed.cpp").exists()
    assert (copy / "build" / "output.o").read_text() == "cached build output"
