"""/proc/sys writes. /proc/sys/net follows the calling thread's netns, so a thread that entered a
pod netns configures the pod's interfaces.

Looked up by path, every /proc/sys/net/... costs time in proportion to the netns on the host that
have ever read /proc/sys/net: each one leaves its own "net" and "ipv4"/"ipv6" dentries under the
same shared parents, and the kernel compares a lookup against each (proc_sys_compare). At 1000
such netns one lookup costs ~140 µs instead of ~18 µs, and runtimes touch /proc/sys in every pod
netns. So the directories below /proc/sys/net/ipv4 and ipv6/conf are opened once per netns and
files are opened relative to them: from there the names are the netns' own (~4 µs at any count).
They are kept for the netns the module was loaded in (the agent's or plugin's own netns, where
host-side work runs); a thread in any other netns (a pod's) opens them for the one call.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

# Directories opened once; the first that `key` starts with is used.
_BASES = ("net/ipv6/conf/", "net/ipv4/")


def _thread_netns() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


_HOME = _thread_netns()
_cache_lock = threading.Lock()
_cached: dict[str, int] = {}
_batch = threading.local()  # .fds: the directories a batch() of this thread opened


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Within the block, a thread in another netns (a pod's) keeps the directories it opens, so
    several knobs cost one lookup of /proc/sys/net/ipv6/conf, not one each."""
    _batch.fds = {}
    try:
        yield
    finally:
        fds, _batch.fds = _batch.fds, None
        for fd in fds.values():
            os.close(fd)


def _open_base(base: str) -> int:
    return os.open(os.path.join("/proc/sys", base), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _base_fd(base: str) -> tuple[int, bool]:
    """(fd of `base` in the calling thread's netns, whether the caller must close it)."""
    if _thread_netns() != _HOME:
        kept: dict[str, int] | None = getattr(_batch, "fds", None)
        if kept is None:
            return _open_base(base), True
        if base not in kept:
            kept[base] = _open_base(base)
        return kept[base], False
    with _cache_lock:
        if base not in _cached:
            _cached[base] = _open_base(base)
        return _cached[base], False


@contextlib.contextmanager
def _opened(key: str, flags: int) -> Iterator[int]:
    base = next((b for b in _BASES if key.startswith(b)), "")
    if base:
        dir_fd, owned = _base_fd(base)
        try:
            fd = os.open(key[len(base):], flags | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            if owned:
                os.close(dir_fd)
    else:
        fd = os.open(os.path.join("/proc/sys", key), flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def read(key: str) -> str:
    with _opened(key, os.O_RDONLY) as fd:
        return os.read(fd, 4096).decode().strip()


def write(key: str, value: str) -> None:
    with _opened(key, os.O_WRONLY) as fd:
        os.write(fd, value.encode())


def ensure(key: str, value: str) -> None:
    """Write only when different: forwarding knobs are shared by every pod of the host."""
    if read(key) != value:
        write(key, value)


def try_write(key: str, value: str) -> bool:
    """For knobs that may be absent (IPv6 disabled in the kernel, a link already gone)."""
    try:
        write(key, value)
    except OSError:
        return False
    return True
