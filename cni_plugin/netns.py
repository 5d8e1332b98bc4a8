"""Network namespaces by fd: open one without ever creating it, and run code inside it.

`setns` changes only the calling thread, so work inside a pod netns runs in a short-lived thread
of its own; the caller's thread (and any other request served by an agent) never moves. Netlink
sockets keep the netns they were created in, so code run there opens its own sockets.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from .spec.errors import INVALID_NETNS, CNIError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NSFS_MAGIC = 0x6E736673
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs fd is (Linux 4.11)

_libc = ctypes.CDLL(None, use_errno=True)


class _StatFS(ctypes.Structure):
    # Only f_type is read; the rest of struct statfs is padding large enough for any arch.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


class NetnsGone(Exception):
    """The netns path does not exist (any more)."""


def open_netns(path: str) -> int:
    """Open `path` as a netns fd; refuse anything that is not a netns. Never creates it, and
    opens nothing else for real: it is looked at through O_PATH first, as a FIFO would block
    the open and a device's open can have effects."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsGone(path) from exc
    except OSError as exc:
        raise CNIError(INVALID_NETNS, "failed to open netns", f"{path}: {exc.strerror}") from exc
    try:
        return reopen(fd, path)
    except NetnsGone:
        raise NetnsGone(path) from None
    finally:
        os.close(fd)


def reopen(fd: int, path: str = "") -> int:
    """A new readable fd for the netns that `fd` (possibly an O_PATH fd, as the launcher sends
    it) refers to; NetnsGone if it is no netns."""
    buf = _StatFS()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0 or buf.f_type != NSFS_MAGIC:
        # An empty file left where a netns used to be mounted is a vanished netns.
        raise NetnsGone(f"fd {fd}")
    new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        kind = fcntl.ioctl(new, NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != CLONE_NEWNET:
        # nsfs holds every kind of namespace: a mount or pid namespace is no pod netns.
        os.close(new)
        raise CNIError(INVALID_NETNS, "not a network namespace", f"{path or fd}: another kind of namespace")
    return new


def same_netns(fd: int) -> bool:
    """Is `fd` the netns the calling thread is in?"""
    mine = os.stat("/proc/thread-self/ns/net")
    theirs = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in(fd: int, func: Callable[[], T]) -> T:
    """Run `func` in a new thread that has entered netns `fd`, and return its result."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            _setns(fd)
            box["result"] = func()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="netns", daemon=True)
    thread.start()
    thread.join()
    error = box.get("error")
    if isinstance(error, BaseException):
        raise error
    return box["result"]  # type: ignore[return-value]
