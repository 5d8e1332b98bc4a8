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

A directory opened inside a pod netns (`open_dir`) keeps naming that netns' knobs whichever
thread writes below it (`write(..., dir_fd=)`): links born in the pod after it was opened
included. So one trip of a thread into the pod serves all of an ADD's pod sysctls.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

# Where /proc/sys is writable: an unprivileged container has it read-only, so the DaemonSet's agent
# is given the host's /proc/sys/net elsewhere (deploy/pybridge.yaml). Set by whoever starts the
# process, like the rest of its environment.
ROOT = os.environ.get("PYBRIDGE_PROC_SYS", "/proc/sys")
# Directories opened once; the first that `key` starts with is used.
_BASES = ("net/ipv6/conf/", "net/ipv4/")


def _thread_netns() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


_HOME = _thread_netns()
_cache_lock = threading.Lock()
_cached: dict[str, int] = {}


def _open_base(base: str) -> int:
    return os.open(os.path.join(ROOT, base), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _base_fd(base: str) -> tuple[int, bool]:
    """(fd of `base` in the calling thread's netns, whether the caller must close it)."""
    if _thread_netns() != _HOME:
        return _open_base(base), True
    with _cache_lock:
        if base not in _cached:
            _cached[base] = _open_base(base)
        return _cached[base], False


def open_dir(base: str) -> int | None:
    """/proc/sys/`base` of the calling thread's netns, as an fd for `dir_fd=`; None if absent
    (`net/ipv6/conf/` in a kernel without IPv6). The caller closes it."""
    try:
        return _open_base(base)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _opened(key: str, flags: int, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(key, flags | os.O_CLOEXEC, dir_fd=dir_fd) if dir_fd is not None else _open_key(key, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_key(key: str, flags: int) -> int:
    base = next((b for b in _BASES if key.startswith(b)), "")
    if not base:
        return os.open(os.path.join(ROOT, key), flags | os.O_CLOEXEC)
    base_fd, owned = _base_fd(base)
    try:
        return os.open(key[len(base):], flags | os.O_CLOEXEC, dir_fd=base_fd)
    finally:
        if owned:
            os.close(base_fd)


def read(key: str) -> str:
    with _opened(key, os.O_RDONLY) as fd:
        return os.read(fd, 4096).decode().strip()


def write(key: str, value: str, dir_fd: int | None = None) -> None:
    """`key` below /proc/sys, or below `dir_fd` (an `open_dir`) when given."""
    with _opened(key, os.O_WRONLY, dir_fd) as fd:
        os.write(fd, value.encode())


def ensure(key: str, value: str) -> None:
    """Write only when different: forwarding knobs are shared by every pod of the host."""
    if read(key) != value:
        write(key, value)


def try_write(key: str, value: str, dir_fd: int | None = None) -> bool:
    """For knobs that may be absent (IPv6 disabled in the kernel, a link already gone)."""
    try:
        write(key, value, dir_fd)
    except OSError:
        return False
    return True
