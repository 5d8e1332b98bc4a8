"""Network namespaces by fd: open one without ever creating it, and run code inside it.

`setns` changes only the calling thread, so work inside a pod netns runs in a worker thread of
its own; the caller's thread (and any other request served by an agent) never moves. Workers are
reused: after each job a worker goes back to the netns it started in and checks it got there,
and one that cannot ends instead of serving again (and never idles inside a pod's netns, which
would keep it alive). Netlink sockets keep the netns they were created in, so code run there
opens its own sockets.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from cnikit.spec.errors import INVALID_NETNS, CNIError

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


def thread_netns() -> tuple[int, int]:
    """The calling thread's netns: (device, inode) of its nsfs file."""
    mine = os.stat("/proc/thread-self/ns/net")
    return mine.st_dev, mine.st_ino


def same_netns(fd: int) -> bool:
    """Is `fd` the netns the calling thread is in?"""
    theirs = os.fstat(fd)
    return thread_netns() == (theirs.st_dev, theirs.st_ino)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


MAX_IDLE_WORKERS = 32
_idle: list[_Worker] = []
_idle_lock = threading.Lock()


class _Worker:
    """A thread that runs one job at a time in a given netns, handed over through two locks
    (a thread start costs ~0.1 ms at best and several ms on a loaded machine)."""

    def __init__(self) -> None:
        self.healthy = True
        self._job: tuple[int, Callable[[], object], dict[str, object]] | None = None
        self._go = threading.Lock()
        self._done = threading.Lock()
        self._go.acquire()
        self._done.acquire()
        threading.Thread(target=self._loop, name="netns", daemon=True).start()

    def run(self, fd: int, func: Callable[[], object]) -> dict[str, object]:
        box: dict[str, object] = {}
        self._job = (fd, func, box)
        self._go.release()
        self._done.acquire()
        return box

    def retire(self) -> None:
        self._job = None
        self._go.release()

    def _loop(self) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while self.healthy:
                self._go.acquire()
                if self._job is None:
                    return
                fd, func, box = self._job
                try:
                    _setns(fd)
                    box["result"] = func()
                except BaseException as exc:  # re-raised in the caller's thread
                    box["error"] = exc
                finally:
                    self.healthy = _go_home(home)
                    self._done.release()
        finally:
            os.close(home)


def _go_home(home: int) -> bool:
    try:
        _setns(home)
        return same_netns(home)
    except OSError:
        return False


def prestart(count: int = MAX_IDLE_WORKERS) -> None:
    """Start idle workers now (the agent, at start): a burst of pods would otherwise start
    them one per call, each start waiting for the GIL the other calls hold."""
    with _idle_lock:
        missing = max(0, min(count, MAX_IDLE_WORKERS) - len(_idle))
    workers = [_Worker() for _ in range(missing)]
    with _idle_lock:
        _idle.extend(workers)


def run_in(fd: int, func: Callable[[], T]) -> T:
    """Run `func` in a worker thread that has entered netns `fd`, and return its result."""
    with _idle_lock:
        worker = _idle.pop() if _idle else None
    worker = worker or _Worker()
    box = worker.run(fd, func)
    with _idle_lock:
        keep = worker.healthy and len(_idle) < MAX_IDLE_WORKERS
        if keep:
            _idle.append(worker)
    if not keep and worker.healthy:
        worker.retire()
    error = box.get("error")
    if isinstance(error, BaseException):
        raise error
    return box["result"]  # type: ignore[return-value]
