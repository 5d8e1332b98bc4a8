"""Opening a store's directories and files: relative to a directory fd with O_NOFOLLOW, so a
symlink planted in the store never redirects a read or write elsewhere, and only directories that
are ours (root's) and not group- or world-writable."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from contextlib import suppress

from cnikit.spec.errors import IO_FAILURE, CNIError

from .hostlocal import LOCK_FILE

OPEN = os.O_CLOEXEC | os.O_NOFOLLOW


def io_error(what: str, path: str, exc: OSError) -> CNIError:
    return CNIError(IO_FAILURE, what, f"{path}: {exc.strerror or exc}")


def _check_owned(path: str, st: os.stat_result) -> None:
    """A store directory someone else can write to lets them delete reservations (two pods, one
    IP) or plant files: it must be ours (root's) and not group- or world-writable."""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CNIError(IO_FAILURE, "unsafe IPAM store directory",
                       f"{path}: owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}; it must be a "
                       f"directory owned by uid {os.geteuid()} and not group- or world-writable")


def _check_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise CNIError(IO_FAILURE, "cannot open the IPAM store lock",
                       f"{path}/{LOCK_FILE}: not a regular file")


def _checked(fd: int, check: Callable[[os.stat_result], None]) -> int:
    """`fd`, once `check` accepted what it is open on; closed if not."""
    try:
        check(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_store_dir(data_dir: str, path: str) -> int:
    """The network's directory `path` in `data_dir`, both made if missing."""
    try:
        os.makedirs(data_dir, 0o755, exist_ok=True)
        with suppress(FileExistsError):
            os.mkdir(path, 0o700)
        _check_owned(data_dir, os.stat(data_dir))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | OPEN)
    except OSError as exc:
        raise io_error("cannot open the IPAM store", path, exc) from exc
    return _checked(fd, lambda st: _check_owned(path, st))


def open_lock_file(dir_fd: int, path: str) -> int:
    """The lock file, a regular file: a FIFO or device there would block or act on open, so it is
    looked at first and opened O_NONBLOCK (the flock wait is the caller's, and bounded)."""
    try:
        with suppress(FileNotFoundError):
            _check_regular(path, os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False))
        fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK | OPEN, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise io_error("cannot open the IPAM store lock", path, exc) from exc
    return _checked(fd, lambda st: _check_regular(path, st))


def open_temp_dir(temp_path: str) -> int | None:
    """The temp directory's fd; None (write in the store itself) if it cannot be used."""
    try:
        with suppress(FileExistsError):
            os.mkdir(temp_path, 0o700)
        fd = os.open(temp_path, os.O_RDONLY | os.O_DIRECTORY | OPEN)
        return _checked(fd, lambda st: _check_owned(temp_path, st))
    except (OSError, CNIError):  # unusable or not safely ours: write in the store instead
        return None


def read_small(dir_fd: int, name: str, limit: int) -> bytes | None:
    """A regular file's bytes; None if missing, not regular, unreadable or over `limit` bytes."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | OPEN, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def write(dir_fd: int, name: str, data: bytes, flags: int, cut: bool = False) -> None:
    """Write `data` into `name`; `cut`: overwrite in place and cut to size, which O_TRUNC would
    do at ~25x the cost on ext4 here (it frees and reallocates the block)."""
    fd = os.open(name, os.O_WRONLY | flags | OPEN, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if cut:
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
