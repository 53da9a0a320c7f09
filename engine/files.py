"""Atomic file writes that behave like a plain `open(path, "w")` towards permissions.

A write goes to a temporary file in the target's directory, then renames over the target,
so a reader never sees half a file. The rename would otherwise change what is at the path:
mkstemp creates 0600 files, and os.replace swaps out whatever the name pointed to. So an
existing regular file keeps its mode, a new file gets 0666 minus the umask, and a path
that holds something other than a regular file (a directory, a FIFO, a device, a symlink)
is refused rather than replaced.
"""
from __future__ import annotations

import os
import stat
import tempfile
import typing as tp
from pathlib import Path

from magnet_engine.engine.errors import InvalidInputError


def _umask() -> int:
    try:   # Linux: read it without changing it (os.umask(x) is process-wide, racy across threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(path: tp.Union[str, os.PathLike]) -> Path:
    """Raise InvalidInputError unless a file can be written at `path`: nothing there or a
    regular file, and the nearest existing directory above it writable (missing directories
    are created by the write)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file")
        raise InvalidInputError(f"cannot write {path}: it is {kind}; give the path of a regular file")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write {path}: directory {parent} is not writable")
    return path


def atomic_write(path: tp.Union[str, os.PathLike], write: tp.Callable[[str], None], suffix: str = "") -> Path:
    """write(temporary path) then rename it to `path`; on any failure nothing is left behind
    and an existing file at `path` is untouched."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        check_output_path(path)   # nothing swapped in meanwhile
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
