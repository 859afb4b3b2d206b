"""Crash-safe file writes: write beside the target, flush to disk, then rename over it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed.

    With `exclusive`, an existing `target` is never replaced: FileExistsError is raised (even in a race)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, target)  # creating a name is atomic and fails if it exists
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: str | Path, data: bytes) -> None:
    """Atomically write `data` to `target`."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    """Atomically write UTF-8 `text` to `target`."""
    write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it becomes `target` (replacing an old one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():  # a crash between the two renames below: put the old copy back
        os.replace(old, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_temporary(path: Path) -> bool:
    """True for the temporary files and folders `atomic_path` / `atomic_dir` write before renaming."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.endswith(".old"))


def remove_stale(folder: str | Path, older_than: float = 3600.0) -> list[Path]:
    """Delete temporaries a killed process left under `folder` (untouched for `older_than` seconds); list them.

    A folder's `.old` copy whose replacement never arrived (killed between the two renames) is put back instead."""
    removed = []
    now = time.time()
    for path in sorted(Path(folder).rglob(".*"), reverse=True):
        try:  # another process may be cleaning the same folder: a path that vanished meanwhile is fine
            if not is_temporary(path) or now - path.lstat().st_mtime < older_than:
                continue
            original = path.with_name(path.name[1:-4])
            if path.name.endswith(".old") and not original.exists():
                os.replace(path, original)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
