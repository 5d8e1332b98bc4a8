"""A store byte-compatible with host-local's (backend/disk), so pyipam and host-local can share a
data directory, and a node can switch between them without losing reservations.

The format is hostlocal.py's, files are opened as paths.py opens them, the lock is lock.py's and
a long-lived process's index is index.py's (an option of the store). Anything in the directory
that is not a well-formed reservation is reported through `warn` and skipped, never fatal.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from cnikit.ip import IPAddress

from . import hostlocal, paths
from .config import DEFAULT_LOCK_TIMEOUT
from .hostlocal import STATUS_PROBE, TEMP_PREFIX
from .index import Indexes
from .lock import held
from .store import Holdings, Reservation, Store

# Where a store reports what it skipped (a file it does not own, a bad name): the call's log
# and stderr (cnikit.log.Logger.notice); a human's `pyipam ls` sees it on stderr.
Warn = Callable[[str], None]


def to_stderr(message: str) -> None:
    sys.stderr.write(f"{message}\n")


class DiskStore(Store):
    def __init__(
        self,
        data_dir: str,
        network: str,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        warn: Warn = to_stderr,
        indexes: Indexes | None = None,
    ) -> None:
        """`indexes`: a long-lived process's (the agent's), to read only what changed since its
        last call; None reads the directory whole."""
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, network)
        self.lock_timeout = lock_timeout
        self._warn = warn
        self._indexes = indexes
        self._dir_fd: int | None = None
        # Reservation files are written here, then linked into the store: creating a file in a
        # directory of ~1000 reservations costs ~1 ms on ext4 (0.07 ms in a small directory),
        # while the link into it is cheap. Per network, so its lock covers it.
        self.temp_path = os.path.join(data_dir, f"{TEMP_PREFIX}{network}")
        self._temp_fd: int | None = None

    def exists(self) -> bool:
        return os.path.isdir(self.path) and not os.path.islink(self.path)

    @contextmanager
    def lock(self) -> Iterator[None]:
        if self._dir_fd is not None:
            raise RuntimeError("store lock is not reentrant")
        with held(self.data_dir, self.path, self.temp_path, self.lock_timeout) as fds:
            self._dir_fd, self._temp_fd = fds
            try:
                yield
            finally:
                self._dir_fd = self._temp_fd = None

    def _fd(self) -> int:
        if self._dir_fd is None:
            raise RuntimeError("store used without its lock")
        return self._dir_fd

    def _read(self, name: str) -> bytes | None:
        return paths.read_small(self._fd(), name, hostlocal.MAX_CONTENT)

    def reserve(self, ip: IPAddress, container_id: str, ifname: str, rangeset_idx: int) -> bool:
        name = str(ip)
        content = hostlocal.reservation_content(container_id, ifname)
        # Written under a temporary name and linked into place (atomic, and exclusive like
        # O_EXCL): a plugin killed mid-write leaves a temp file, never an empty reservation file
        # that no DEL or GC could attribute to anyone.
        try:
            try:
                self._link_new(name, content, self._temp_fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV or self._temp_fd is None:
                    raise
                self._link_new(name, content, None)  # the store is a file system of its own
        except FileExistsError:
            return False
        except OSError as exc:
            raise paths.io_error("failed to reserve an IP", f"{self.path}/{name}", exc) from exc
        last = hostlocal.last_reserved_name(rangeset_idx)
        try:
            paths.write(self._fd(), last, name.encode(), os.O_CREAT, cut=True)
        except OSError as exc:
            self.release(ip)
            raise paths.io_error("failed to record the last reserved IP", f"{self.path}/{last}", exc) from exc
        return True

    def _link_new(self, name: str, content: bytes, temp_fd: int | None) -> None:
        temp_fd = self._fd() if temp_fd is None else temp_fd
        temp = f"{TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
        paths.write(temp_fd, temp, content, os.O_CREAT | os.O_EXCL)
        try:
            os.link(temp, name, src_dir_fd=temp_fd, dst_dir_fd=self._fd(), follow_symlinks=False)
        finally:
            os.unlink(temp, dir_fd=temp_fd)

    def release(self, ip: IPAddress) -> None:
        try:
            with suppress(FileNotFoundError):
                os.unlink(str(ip), dir_fd=self._fd())
        except OSError as exc:
            raise paths.io_error("failed to release an IP", f"{self.path}/{ip}", exc) from exc

    def last_reserved_ip(self, rangeset_idx: int) -> IPAddress | None:
        name = hostlocal.last_reserved_name(rangeset_idx)
        data = self._read(name)
        if data is None:
            return None
        ip = hostlocal.last_reserved_ip(data)
        if ip is None:
            self._warn(f"{self.path}/{name}: not an IP address, ignored")
        return ip

    def reservations(self) -> list[Reservation]:
        entries, _ = self._current()
        return [r for _, r in sorted(entries.items()) if r is not None]

    def holdings(self) -> Holdings:
        return self._current()[1]

    def _current(self) -> tuple[dict[str, Reservation | None], Holdings]:
        """The store's names as they are now, and its holdings: the index brought up to date by
        the names that changed, or the directory read whole."""
        kept = self._indexes.of(self.path) if self._indexes is not None else None
        names = kept.changed(self._fd()) if kept is not None else None
        if kept is not None and names is not None:
            entries, holdings = kept.entries, kept.holdings
        else:
            entries, holdings = {}, Holdings()
            try:
                names = set(os.listdir(self._fd()))
            except OSError as exc:
                raise paths.io_error("cannot list the IPAM store", self.path, exc) from exc
            self._remove_leftovers()
        for name in names:
            self._load(name, entries, holdings)
        if kept is not None:
            kept.entries, kept.holdings = entries, holdings
        return entries, holdings

    def _remove_leftovers(self) -> None:
        """Temp files of killed writers: we hold the lock, so no reserve() is under way."""
        if self._temp_fd is None:
            return
        with suppress(OSError):
            for name in os.listdir(self._temp_fd):
                if name.startswith(TEMP_PREFIX):
                    with suppress(OSError):
                        os.unlink(name, dir_fd=self._temp_fd)

    def _load(self, name: str, entries: dict[str, Reservation | None], holdings: Holdings) -> None:
        """Read one name of the directory into `entries` (and `holdings`): its reservation, None
        if it is not one, or no entry if it is gone or not a reservation by its name."""
        old = entries.pop(name, None)
        if old is not None:
            holdings.discard(old)
        if hostlocal.is_bookkeeping(name):
            return
        if name.startswith(TEMP_PREFIX):
            # We hold the lock, so no reserve() is under way: a killed writer's leftover.
            with suppress(OSError):
                os.unlink(name, dir_fd=self._fd())
            return
        try:
            st = os.stat(name, dir_fd=self._fd(), follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError:
            st = None
        ip = hostlocal.ip_named(name)
        data = self._read(name) if ip is not None and st and stat.S_ISREG(st.st_mode) else None
        owner = hostlocal.owner(data) if data is not None else None
        if ip is None or owner is None:
            self._warn(f"{self.path}/{name}: not a reservation file, skipped")
            entries[name] = None
            return
        entries[name] = reservation = Reservation(ip, *owner)
        holdings.add(reservation)

    def probe_writable(self) -> None:
        """Create and remove a file, as the next ADD would (for STATUS)."""
        try:
            paths.write(self._fd(), STATUS_PROBE, b"", os.O_CREAT | os.O_TRUNC)
            os.unlink(STATUS_PROBE, dir_fd=self._fd())
        except OSError as exc:
            raise paths.io_error("the IPAM store is not writable", self.path, exc) from exc
