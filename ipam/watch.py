"""Which names in a directory changed since the last look (inotify), for a long-lived process that
keeps an index of a store directory instead of reading every file on every call.

The kernel queues an event before the syscall that made the change returns, so a process that
holds the store's flock sees, by draining its queue, every change made by an earlier holder
(host-local, a one-shot pyipam, another agent). libc is reached through ctypes (the stdlib has
no inotify); a failure to watch only means the caller reads the whole directory, as before.
"""

from __future__ import annotations

import ctypes
import os
import struct

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000

NAME_EVENTS = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
# Events after which the queue no longer describes the directory: read all of it again.
LOST = IN_DELETE_SELF | IN_MOVE_SELF | IN_Q_OVERFLOW | IN_IGNORED
_EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len; then the name

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


class Watch:
    """One inotify instance watching one directory, given as an open fd."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        self.wd = -1

    def rewatch(self, dir_fd: int) -> bool:
        """Watch the directory `dir_fd` is open on (the inode, not a path that may be swapped);
        False if that is not the directory watched so far (a first look, or it was replaced)."""
        wd = _check(_libc.inotify_add_watch(self.fd, f"/proc/self/fd/{dir_fd}".encode(),
                                            NAME_EVENTS | LOST | IN_ONLYDIR))
        same, self.wd = wd == self.wd, wd
        return same

    def changed(self) -> set[str] | None:
        """Names changed since the last call; None if changes may have been lost."""
        names: set[str] = set()
        lost = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return None if lost else names
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + size].rstrip(b"\0")
                offset += size
                if mask & LOST or wd != self.wd:
                    lost = True
                elif name:
                    names.add(os.fsdecode(name))

    def close(self) -> None:
        os.close(self.fd)
