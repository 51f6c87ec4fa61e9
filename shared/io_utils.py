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


def check_writable_file(path: str | os.PathLike) -> str:
    """The file a write to `path` would replace (symlinks followed, so a link keeps pointing at
    the new file), after checking that it can be written; OSError subclasses naming the problem."""
    path = os.fspath(path)
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
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: no permission to create files in {parent}")
    _probe(path, _temporary_name(target))
    return target


def _probe(path: str, probe: str) -> None:
    """Create and remove `probe`: os.access passes for root and says nothing of name lengths or
    file systems that refuse new files (/proc), so only a real file proves a later write works."""
    try:
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    os.unlink(probe)


def check_writable_dir(path: str | os.PathLike) -> str:
    """The absolute path of folder `path` after checking that it is, or can be created as, a
    writable folder; OSError subclasses naming the problem."""
    path = os.fspath(path)
    folder = os.path.realpath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write into {path}: it is a file, not a folder")
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"cannot create folder {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {path}: no permission to write in {existing}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot create folder {path}: {exc.strerror}") from None
    _probe(path, _temporary_name(os.path.join(folder, "probe")))
    return folder


def _temporary_name(target: str, suffix: str = "") -> str:
    """A fresh name beside `target`: os.replace is only atomic within one file system."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.{secrets.token_hex(8)}.tmp{suffix}")


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
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name beside `path` for a library that writes by file name
    (MindSpore, the ONNX exporter); the file is renamed over `path` only if the block
    completes, and removed otherwise.

    `suffix` ends the temporary name, for writers that append their own extension to any
    name lacking it.
    """
    path = os.fspath(path)
    target = check_writable_file(path)
    parent = os.path.dirname(target)
    tmp = _temporary_name(target, suffix)
    try:
        # Created here, empty, to claim the name and to learn the mode open() would give it:
        # some writers make their files read-only, which would block the next write.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except PermissionError as exc:
        raise PermissionError(f"cannot write {path}: no permission to create files in {parent}") from exc
    mode = stat.S_IMODE(os.stat(target if os.path.exists(target) else tmp).st_mode)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(parent)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file object whose contents replace `path` only if the block completes.

    On any exception the temporary file is removed and `path` is left as it was.
    `mode` is "wb" (bytes) or "w" (UTF-8 text).
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_writer mode must be one of {_WRITE_MODES}, got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
        yield handle


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (see atomic_writer)."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def atomic_write_png(path: str | os.PathLike, figure) -> None:
    """A matplotlib figure as a PNG at `path`, then closed: rendered in memory and written
    atomically, so a failed render leaves nothing behind."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large weight files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
