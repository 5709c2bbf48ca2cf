"""Folders as trust boundaries. A run or sweep folder may come from someone else (copied, unpacked,
shared on a cluster): cfbench never follows a symbolic link inside one, so it can never be made to
write outside it. Files it reads are bounded in size and must be regular files (a link to an
endless device is refused, not read until memory runs out). Files it creates respect the umask.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Iterable, Union

from .errors import CfbenchError

PathLike = Union[str, Path]


def refuse_links(folder: Path, what: str, names: Iterable[str] = ()) -> None:
    """One line if `folder` holds a symbolic link: anywhere in its tree, or -- given `names` --
    among those entries (and anywhere below the ones that are folders)."""
    folder = Path(folder)
    roots = [folder / n for n in names] if names else [folder]
    for root in roots:
        if root != folder and os.path.islink(root):
            _refuse(root, what)
        if root.is_dir() and not root.is_symlink():
            for parent, dirs, files in os.walk(root):
                for name in dirs + files:
                    if os.path.islink(os.path.join(parent, name)):
                        _refuse(Path(parent) / name, what)


def _refuse(link: Path, what: str) -> None:
    raise CfbenchError(f"{link}: a symbolic link inside the {what}; cfbench never writes through a link in a "
                       "folder it may not have made (remove the link, or copy the folder with `cp -rL`)")


def open_no_follow(path: PathLike, flags: int, what: str = "file") -> int:
    """os.open that refuses a symbolic link as the last component (one line), creating with the
    umask's mode."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as err:
        if os.path.islink(path):
            raise CfbenchError(f"{path}: the {what} is a symbolic link; cfbench never writes through one") from None
        raise CfbenchError(f"{path}: cannot open the {what} ({err.strerror})") from None


def open_append(path: PathLike, what: str = "log file", **text_kwargs):
    """A text file opened for appending, never through a symbolic link."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what)
    return os.fdopen(fd, "a", encoding="utf-8", **text_kwargs)


class AppendLogHandler(logging.FileHandler):
    """logging's FileHandler without following a link, and quiet when the disk is full (the error
    that stops the run says so once; a logging traceback per line would bury it)."""

    def _open(self):
        return open_append(self.baseFilename, "log", errors=self.errors)

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def read_regular(path: PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (links to regular files are fine: this
    only reads); a device, FIFO or folder, or a bigger file, is one line."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CfbenchError(f"{path}: no such {what}") from None
    except OSError as err:
        raise CfbenchError(f"{path}: cannot read the {what} ({err.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CfbenchError(f"{path}: the {what} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > limit:
            raise CfbenchError(f"{path}: the {what} is {info.st_size:,} bytes, over the {limit:,} a {what} may be")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise CfbenchError(f"{path}: the {what} is over the {limit:,} bytes a {what} may be")
    return data


def creation_mode() -> int:
    """0o666 less this process's umask: the mode `open()` would give a new file (mkstemp's 0o600
    would leave results unreadable to a cluster group)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it back at once
    os.umask(mask)
    return 0o666 & ~mask
