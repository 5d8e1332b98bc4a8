"""Replacing a file that others may read or exec at the same moment: the new one is made under a
temp name in the same directory, then renamed over the old, so a reader sees the old or the new,
never half of one. The temp name ends in neither .conf, .conflist nor .json: a runtime scanning
the directory never loads it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable


def replace(path: str, make: Callable[[str], None]) -> None:
    """`make(tmp)` creates the new file (or symlink) at a free path beside `path`, which it then
    replaces; on any failure the temp file is removed and `path` is left as it was."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        make(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str, data: bytes, mode: int = 0o644) -> bool:
    """Write `data` to `path` (synced before it replaces the old file); False if unchanged."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        if f.read() == data:
            return False
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def make(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)

    replace(path, make)
    return True
