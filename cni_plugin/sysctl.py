"""/proc/sys writes. /proc/sys/net follows the calling thread's netns, so a thread that entered a
pod netns configures the pod's interfaces."""

from __future__ import annotations

import os


def _path(key: str) -> str:
    return os.path.join("/proc/sys", key)


def read(key: str) -> str:
    with open(_path(key)) as f:
        return f.read().strip()


def write(key: str, value: str) -> None:
    with open(_path(key), "w") as f:
        f.write(value)


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
