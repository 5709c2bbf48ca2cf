"""The ground floor: the file primitives every room uses.

- Folders as trust boundaries: a run or sweep folder may come from someone else (copied,
  unpacked, shared on a cluster), so cfbench never follows a symbolic link inside one and can
  never be made to write outside it.
- Atomic writers: a file is the old one or the new one, with the umask's mode; a full disk is one
  line naming the folder.
- Strict one-line readers: a regular file under a size limit (a link to an endless device is
  refused, not read until memory runs out); YAML without aliases; JSON without NaN, Infinity or
  repeated keys.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Union

import yaml

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


# ---- atomic writers ---------------------------------------------------------------------

def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target (a link
    there is replaced, never followed). The file gets the umask's mode; a full disk or another
    write error is one line naming the folder, and the previous file stays whole."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_with(path: Union[str, Path], write: Callable[[BinaryIO], Any]) -> None:
    """`atomic_write_bytes` with the bytes streamed by `write(file)` (a checkpoint serialised
    straight to disk: no copy of it in memory)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # .<name>.<random>.<pid>.tmp: the pid lets a later process tell a killed writer's leftovers
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), creation_mode())
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise


def _write_error(path: Path, err: OSError) -> CfbenchError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CfbenchError(f"{path.parent}: the disk is full (no space left to write {path.name}); what was "
                            "written before is intact: free space, then continue with --resume")
    return CfbenchError(f"{path}: cannot write it ({err.strerror or type(err).__name__})")


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_null(obj: Any) -> Any:
    """obj with every NaN / ±inf float replaced by None: strict JSON (RFC 8259 has no Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs) -> str:
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Union[str, Path], obj: Any) -> None:
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=False) + "\n")


# ---- strict readers ----------------------------------------------------------------------

TEXT_BYTES = 8 * 1024 ** 2  # configs, sweep files, progress and metrics files, captions are far smaller


def read_text(path: Path, what: str = "file", limit: int = TEXT_BYTES) -> str:
    """A UTF-8 text file: a regular file of at most `limit` bytes (read_regular)."""
    try:
        return read_regular(path, limit, what).decode("utf-8")
    except UnicodeDecodeError:
        raise CfbenchError(f"{path}: not a UTF-8 text file") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large for a number")
    return value


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def parse_json(text: str, source: str) -> Any:
    """Strict JSON: no NaN / Infinity literals (nor numbers that overflow to them), no key twice in
    an object."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise CfbenchError(f"{source}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except (ValueError, RecursionError) as err:
        raise CfbenchError(f"{source}: not valid JSON ({str(err)[:200] or 'nested too deeply'})") from None


def read_json(path: Path, what: str = "file") -> Any:
    return parse_json(read_text(path, what), str(path))


def read_json_object(path: Path, what: str = "file") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: expected a JSON object")
    return data


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few hundred bytes of nested aliases expand to
    gigabytes once copied; no cfbench file needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (*name) are not accepted; write the "
                                              "values out", event.start_mark)
        return super().compose_node(parent, index)


# YAML 1.1 (PyYAML) reads 1e-4 -- no dot -- as a string; YAML 1.2 and every reader of a learning
# rate read a number. Exponent numbers without a dot are floats here too.
_NoAliasLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        raise CfbenchError(f"{source}: not valid YAML ({' '.join(str(err).split())[:300]})") from None
    except RecursionError:
        raise CfbenchError(f"{source}: not valid YAML (nested too deeply)") from None


def read_yaml_mapping(path: Path, what: str = "file") -> dict:
    """The file's top-level mapping; an empty file is an empty mapping."""
    data = parse_yaml(read_text(path, what), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CfbenchError(f"{path}: the top level must be a mapping")
    return data
