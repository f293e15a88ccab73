"""Mirrors the source tree's files (tracked and untracked-but-not-ignored) into a build directory.

Only files whose content changed are written, so the copies of unchanged files keep their timestamps
and ninja rebuilds only what changed, even though CI checks out a fresh clone (new timestamps
everywhere) on every run. Files the previous sync wrote and that are gone now are removed; build
outputs in the destination are left alone.

    python .ci/sync_sources.py SOURCE_ROOT DESTINATION
"""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

MANIFEST = ".synced-files"


def source_files(root: Path) -> list[str]:
    listing = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
    return sorted(name for name in listing.split("\0") if name and (root / name).is_file())


def main(source: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    names = source_files(source)
    manifest = destination / MANIFEST
    previous = set(manifest.read_text().splitlines()) if manifest.exists() else set()
    for stale in previous - set(names):
        (destination / stale).unlink(missing_ok=True)
    changed = 0
    for name in names:
        target = destination / name
        if target.is_file() and filecmp.cmp(source / name, target, shallow=False):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target)
        changed += 1
    manifest.write_text("\n".join(names) + "\n")
    print(f"{len(names)} source files, {changed} written, {len(previous - set(names))} removed")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
