"""Crash-safe file writing and file hashing.

A write goes to a temporary file beside the target, is flushed to disk, and only then
renamed over the target: readers see either the old file or the complete new one, never
a half-written weight file, even if the writer dies mid-way.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from typing import IO, Iterator

_WRITE_MODES = ("wb", "w")


def _check_target(path: str) -> str:
    """The file to replace (symlinks followed, so a link keeps pointing at the new file)."""
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise NotADirectoryError(f"cannot write {path}: {parent} is not a directory")
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    # The rename would silently replace a read-only file; honour the read-only bit instead.
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise PermissionError(f"cannot write {path}: the file is read-only")
    return target


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable; best effort, as not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file object whose contents replace `path` only if the block completes.

    On any exception the temporary file is removed and `path` is left as it was.
    `mode` is "wb" (bytes) or "w" (UTF-8 text).
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_writer mode must be one of {_WRITE_MODES}, got {mode!r}")
    path = os.fspath(path)
    target = _check_target(path)
    parent, name = os.path.split(target)
    # Same directory as the target: os.replace is only atomic within one file system.
    tmp = os.path.join(parent, f".{name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        # Mode 0o666 lets the umask decide permissions, as for a file opened with open().
        fd = os.open(tmp, flags, 0o666)
    except PermissionError as exc:
        raise PermissionError(f"cannot write {path}: no permission to create files in {parent}") from exc
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            if os.path.exists(target):
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (see atomic_writer)."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large weight files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
