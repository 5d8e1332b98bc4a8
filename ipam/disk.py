"""A store byte-compatible with host-local's (backend/disk), so pyipam and host-local can share a
data directory, and a node can switch between them without losing reservations.

Layout of `<dataDir>/<network>/`: one file per reserved IP, named by the IP, holding
`<containerID>\\r\\n<ifname>`; `last_reserved_ip.<rangeset index>`; and `lock`, the flock target.
All files are opened relative to the directory's fd with O_NOFOLLOW, so a symlink planted in the
store never redirects a read or write elsewhere. Anything in the directory that is not a
well-formed reservation is reported through `warn` and skipped, never fatal.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress

from cnikit import log, turns
from cnikit.ip import IPAddress, parse_ip
from cnikit.spec.args import validate_container_id, validate_ifname
from cnikit.spec.errors import IO_FAILURE, TRY_AGAIN_LATER, CNIError

from .config import DEFAULT_LOCK_TIMEOUT
from .store import Holdings, Reservation, Store

LOCK_FILE = "lock"
LAST_RESERVED_PREFIX = "last_reserved_ip."
STATUS_PROBE = "status.probe"
TEMP_PREFIX = ".pyipam-tmp."
SEPARATOR = "\r\n"
MAX_CONTENT = 1024

_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW

# The agent's index of each store directory it serves: what every name in it held when last read,
# kept right by the directory's inotify events (watch.py), so an ADD on a full store reads only
# the names that changed since the last call, whoever changed them. Off in one-shot processes.
_INDEXES: dict[str, _Index] = {}
_keep_indexes = False
# Where a store reports what it skipped (a file it does not own, a bad name): the call's log
# and stderr (cnikit.log.Logger.notice); a human's `pyipam ls` sees it on stderr.
Warn = Callable[[str], None]


def to_stderr(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def _io_error(what: str, path: str, exc: OSError) -> CNIError:
    return CNIError(IO_FAILURE, what, f"{path}: {exc.strerror or exc}")


def _ip_named(name: str) -> IPAddress | None:
    """The IP a file name stands for; only canonical spellings, as host-local writes them."""
    try:
        ip = parse_ip(name)
    except ValueError:
        return None
    return ip if str(ip) == name else None


def _owner(data: bytes) -> tuple[str, str | None] | None:
    try:
        container_id, sep, ifname = data.decode("utf-8").strip().partition(SEPARATOR)
        validate_container_id(container_id)
        if sep:
            validate_ifname(ifname)
    except (UnicodeDecodeError, CNIError):
        return None
    return container_id, ifname if sep else None


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


def keep_indexes() -> None:
    """For a long-lived process (the agent): index each store instead of reading it whole."""
    global _keep_indexes
    _keep_indexes = True


class _Index:
    """One store directory's names as last read (None: not a reservation) and its watch."""

    def __init__(self) -> None:
        from . import watch  # ctypes: only the agent pays for it, never a one-shot call

        self.watch = watch.Watch()
        self.entries: dict[str, Reservation | None] = {}
        self.holdings = Holdings()

    def changed(self, dir_fd: int) -> set[str] | None:
        """Names to read again, or None when the whole directory must be read."""
        try:
            same = self.watch.rewatch(dir_fd)
            names = self.watch.changed()
        except OSError:
            return None
        return names if same else None


def _index(path: str) -> _Index | None:
    if not _keep_indexes:
        return None
    index = _INDEXES.get(path)
    if index is None:
        try:
            index = _INDEXES[path] = _Index()
        except OSError as exc:  # e.g. the inotify instance limit: read whole, as one-shot calls do
            log.process().warning("ipam_no_index", store=path, error=str(exc), effect="read whole")
    return index


_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


def _local_lock(path: str) -> threading.Lock:
    with _LOCAL_LOCKS_GUARD:
        return _LOCAL_LOCKS.setdefault(path, threading.Lock())


class DiskStore(Store):
    def __init__(
        self,
        data_dir: str,
        network: str,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        warn: Warn = to_stderr,
    ) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, network)
        self.lock_timeout = lock_timeout
        self._warn = warn
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
        deadline = time.monotonic() + self.lock_timeout
        with ExitStack() as stack:
            # Threads of one process (the agent's concurrent calls) queue on a lock of their own,
            # which hands over at once; only other processes are met by polling the flock. The
            # queue keeps its turn (cnikit/turns.py): a call handed the lock without one would
            # hold the store while it waited for a turn (IPAM took ~35 ms in a burst of 32 ADDs).
            local = _local_lock(self.path)
            if not local.acquire(timeout=self.lock_timeout):
                raise self._timed_out()
            stack.callback(local.release)
            dir_fd = self._open_dir()
            stack.callback(os.close, dir_fd)
            lock_fd = self._open_lock(dir_fd)
            stack.callback(os.close, lock_fd)  # closing the fd drops the flock
            self._flock(lock_fd, deadline)
            self._temp_fd = self._open_temp_dir()
            if self._temp_fd is not None:
                stack.callback(os.close, self._temp_fd)
            self._dir_fd = dir_fd
            try:
                yield
            finally:
                self._dir_fd = self._temp_fd = None

    def _timed_out(self) -> CNIError:
        return CNIError(
            TRY_AGAIN_LATER,
            "timed out waiting for the IPAM store lock",
            f"{self.path} is locked by another process for more than {self.lock_timeout}s",
        )

    def _open_dir(self) -> int:
        try:
            os.makedirs(self.data_dir, 0o755, exist_ok=True)
            with suppress(FileExistsError):
                os.mkdir(self.path, 0o700)
            _check_owned(self.data_dir, os.stat(self.data_dir))
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
        except OSError as exc:
            raise _io_error("cannot open the IPAM store", self.path, exc) from exc
        return _checked(fd, lambda st: _check_owned(self.path, st))

    def _open_lock(self, dir_fd: int) -> int:
        """The lock file, a regular file: a FIFO or device there would block or act on open, so
        it is looked at first and opened O_NONBLOCK (the flock wait is ours, and bounded)."""
        try:
            with suppress(FileNotFoundError):
                _check_regular(self.path, os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False))
            fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK | _OPEN, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise _io_error("cannot open the IPAM store lock", self.path, exc) from exc
        return _checked(fd, lambda st: _check_regular(self.path, st))

    def _open_temp_dir(self) -> int | None:
        """The temp directory's fd; None (write in the store itself) if it cannot be used."""
        try:
            with suppress(FileExistsError):
                os.mkdir(self.temp_path, 0o700)
            fd = os.open(self.temp_path, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
            return _checked(fd, lambda st: _check_owned(self.temp_path, st))
        except (OSError, CNIError):  # unusable or not safely ours: write in the store instead
            return None

    def _flock(self, fd: int, deadline: float) -> None:
        """Poll a non-blocking flock so a stuck holder yields "try again later", never a hang."""
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out()
            with turns.waiting():
                time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.01)

    def _fd(self) -> int:
        if self._dir_fd is None:
            raise RuntimeError("store used without its lock")
        return self._dir_fd

    def _read(self, name: str) -> bytes | None:
        """A small regular file's bytes; None if missing, not regular, unreadable or too big."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self._fd())
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, MAX_CONTENT + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        return data if len(data) <= MAX_CONTENT else None

    def _write(
        self, name: str, data: bytes, flags: int, dir_fd: int | None = None, cut: bool = False
    ) -> None:
        """Write `data` into `name`; `cut`: overwrite in place and cut to size, which O_TRUNC
        would do at ~25x the cost on ext4 here (it frees and reallocates the block)."""
        where = self._fd() if dir_fd is None else dir_fd
        fd = os.open(name, os.O_WRONLY | flags | _OPEN, 0o600, dir_fd=where)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if cut:
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def reserve(self, ip: IPAddress, container_id: str, ifname: str, rangeset_idx: int) -> bool:
        name = str(ip)
        content = f"{container_id}{SEPARATOR}{ifname}".encode()
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
            raise _io_error("failed to reserve an IP", f"{self.path}/{name}", exc) from exc
        last = f"{LAST_RESERVED_PREFIX}{rangeset_idx}"
        try:
            self._write(last, name.encode(), os.O_CREAT, cut=True)
        except OSError as exc:
            self.release(ip)
            raise _io_error("failed to record the last reserved IP", f"{self.path}/{last}", exc) from exc
        return True

    def _link_new(self, name: str, content: bytes, temp_fd: int | None) -> None:
        temp_fd = self._fd() if temp_fd is None else temp_fd
        temp = f"{TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
        self._write(temp, content, os.O_CREAT | os.O_EXCL, temp_fd)
        try:
            os.link(temp, name, src_dir_fd=temp_fd, dst_dir_fd=self._fd(), follow_symlinks=False)
        finally:
            os.unlink(temp, dir_fd=temp_fd)

    def release(self, ip: IPAddress) -> None:
        try:
            with suppress(FileNotFoundError):
                os.unlink(str(ip), dir_fd=self._fd())
        except OSError as exc:
            raise _io_error("failed to release an IP", f"{self.path}/{ip}", exc) from exc

    def last_reserved_ip(self, rangeset_idx: int) -> IPAddress | None:
        name = f"{LAST_RESERVED_PREFIX}{rangeset_idx}"
        data = self._read(name)
        if data is None:
            return None
        try:
            return parse_ip(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            self._warn(f"{self.path}/{name}: not an IP address, ignored")
            return None

    def reservations(self) -> list[Reservation]:
        entries, _ = self._current()
        return [r for _, r in sorted(entries.items()) if r is not None]

    def holdings(self) -> Holdings:
        return self._current()[1]

    def _current(self) -> tuple[dict[str, Reservation | None], Holdings]:
        """The store's names as they are now, and its holdings: the index brought up to date by
        the names that changed, or the directory read whole."""
        index = _index(self.path)
        names = index.changed(self._fd()) if index is not None else None
        if index is not None and names is not None:
            entries, holdings = index.entries, index.holdings
        else:
            entries, holdings = {}, Holdings()
            try:
                names = set(os.listdir(self._fd()))
            except OSError as exc:
                raise _io_error("cannot list the IPAM store", self.path, exc) from exc
            self._remove_leftovers()
        for name in names:
            self._load(name, entries, holdings)
        if index is not None:
            index.entries, index.holdings = entries, holdings
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
        if name in (LOCK_FILE, STATUS_PROBE) or name.startswith(LAST_RESERVED_PREFIX):
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
        ip = _ip_named(name)
        data = self._read(name) if ip is not None and st and stat.S_ISREG(st.st_mode) else None
        owner = _owner(data) if data is not None else None
        if ip is None or owner is None:
            self._warn(f"{self.path}/{name}: not a reservation file, skipped")
            entries[name] = None
            return
        entries[name] = reservation = Reservation(ip, *owner)
        holdings.add(reservation)

    def probe_writable(self) -> None:
        """Create and remove a file, as the next ADD would (for STATUS)."""
        try:
            self._write(STATUS_PROBE, b"", os.O_CREAT | os.O_TRUNC)
            os.unlink(STATUS_PROBE, dir_fd=self._fd())
        except OSError as exc:
            raise _io_error("the IPAM store is not writable", self.path, exc) from exc
