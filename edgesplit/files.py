"""Writing files without losing any: each file appears whole or not at all, and nothing is deleted that the caller
did not name. Temporary files live beside their target (same file system, so the final rename is atomic)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from edgesplit.errors import OutputError


def _mode_for(target: Path) -> int:
    """The old file's mode, or what a plain open() would give a new one (mkstemp's own is 600)."""
    if target.is_file():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_beside(target: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, _mode_for(target))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def replace_files(directory: Path, files: Mapping[str, bytes], remove: Iterable[str] = ()) -> None:
    """Write every file of `files` (name -> bytes) into `directory`, in the given order, each replacing its old
    version atomically; then delete the names in `remove`. Everything is written to temporary files first, so a
    failure while writing (disk full, Ctrl-C) leaves the directory as it was."""
    temps: dict[str, Path] = {}
    try:
        for name, data in files.items():
            temps[name] = _temp_beside(directory / name, data)
        for name, temp in temps.items():
            os.replace(temp, directory / name)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    for name in remove:
        (directory / name).unlink(missing_ok=True)


def check_new_file(path: Path, what: str) -> None:
    """`path` can be written as a file: not a directory, and in a folder that exists."""
    if path.is_dir():
        raise OutputError(f"expected {what} to name a file, got {str(path)!r}, which is a directory")
    if not path.parent.is_dir():
        raise OutputError(f"expected {what} in an existing folder, but {str(path.parent)!r} does not exist "
                             f"(create it first)")


def save_npz(path: Path, arrays: Mapping[str, np.ndarray], what: str = "the output file") -> None:
    """Write an .npz atomically (the arrays are serialised in memory first; no temporary is left behind)."""
    check_new_file(path, what)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    replace_files(path.parent, {path.name: buffer.getvalue()})
