"""pybridge's own record of each attachment's netns path (CNI_NETNS), for the collector.

libcni caches the netns path only from 1.2 on (containerd 2.x), and only once the whole chain's
ADD succeeded: a runtime killed mid-ADD, or containerd 1.6/1.7, leaves reservations whose netns
no one recorded, which the collector must then keep forever. So ADD records it before the IPAM
reservation is made, and DEL removes it after the reservation is released: every reservation
pybridge made has a record.

The records live beside the IPAM store they describe, `<dataDir>/.pybridge-netns/<network>/
<container id>:<ifname>`, holding the path alone: on the same disk as the store, so they survive
a reboot as it does, and in a directory whose name no network can have (network names start
with a letter or digit), so host-local and pyipam, which read `<dataDir>/<network>/`, never see
them. Neither a container id nor an ifname can hold ':' or '/', so the name is unambiguous.

A record is read as hostile input: no symlink followed, regular files only, bounded, and its
path must be a plausible netns path (`plausible`) or it counts as no record at all.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Set as AbstractSet

from cnikit.spec.errors import INTERNAL, CNIError
from cnikit.spec.names import absolute_path, validate_network_name

from . import files

DIR = ".pybridge-netns"
STORE_TYPES = ("pyipam", "host-local")  # IPAM plugins that keep a host-local store
MAX_BYTES = 4096
ROOTS_ENV = "PYBRIDGE_NETNS_ROOTS"
DEFAULT_ROOTS = ("/proc", "/run", "/var/run")  # kubelet's /proc/<pid>/ns/net, runtimes' pins
# ipam.config's default, not imported from there: that costs an exec'd ADD ~30 ms of imports.
DEFAULT_DATA_DIR = "/var/lib/cni/networks"


def data_dir(ipam: dict[str, object]) -> str | None:
    """The data dir of an IPAM block with a host-local store, None for other IPAM types or a
    dataDir that is no absolute path (the IPAM plugin refuses that one itself)."""
    if ipam.get("type") not in STORE_TYPES:
        return None
    try:
        return absolute_path(ipam.get("dataDir", DEFAULT_DATA_DIR))
    except ValueError:
        return None


def path(data_dir: str, network: str, container_id: str, ifname: str) -> str:
    """CNIError if `network` is no network name (container id and ifname are checked by then)."""
    return os.path.join(data_dir, DIR, validate_network_name(network), f"{container_id}:{ifname}")


def write(data_dir: str, network: str, container_id: str, ifname: str, netns: str) -> bool:
    """Record `netns`, replacing any older record (unsynced, as the store's own files). False,
    and nothing made, while the data dir does not exist: the IPAM plugin creates it, with its own
    checks, at its first reservation (the ADD writes the record after that one)."""
    target = path(data_dir, network, container_id, ifname)
    if not os.path.isdir(data_dir):
        return False

    def make(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(netns.encode())

    try:
        for directory in (os.path.join(data_dir, DIR), os.path.dirname(target)):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
        files.replace(target, make)
    except OSError as exc:
        raise CNIError(INTERNAL, "failed to record the netns path",
                       f"{target}: {exc.strerror or exc}") from exc
    return True


def remove(data_dir: str, network: str, container_id: str, ifname: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path(data_dir, network, container_id, ifname))


def roots() -> tuple[str, ...]:
    """Where netns paths may be: the defaults, or the absolute dirs of PYBRIDGE_NETNS_ROOTS
    (':'-separated; a runtime whose state dir holds its pins elsewhere)."""
    given = [r for r in os.environ.get(ROOTS_ENV, "").split(":") if r.startswith("/")]
    return tuple(os.path.normpath(r) for r in given) or DEFAULT_ROOTS


def plausible(netns: str) -> bool:
    """An absolute, normalised path (no '..', no '//') under one of `roots()`."""
    return netns.startswith("/") and "\0" not in netns and os.path.normpath(netns) == netns \
        and any(netns.startswith(root.rstrip("/") + "/") for root in roots())


def read(data_dir: str, network: str, container_id: str, ifname: str) -> str | None:
    """The recorded netns path, or None: no record, or one that is not a plausible path."""
    try:
        fd = os.open(path(data_dir, network, container_id, ifname),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, CNIError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        netns = raw.decode()
    except UnicodeDecodeError:
        return None
    return netns if len(raw) <= MAX_BYTES and plausible(netns) else None


def orphans(data_dir: str, network: str, reserved: AbstractSet[tuple[str, str]], min_age: float) -> list[str]:
    """Names (`<container id>:<ifname>`) of the records no reservation has, whose netns path is
    gone and which are at least `min_age` seconds old: what an ADD killed between its record and
    its reservation leaves (an ADD in flight has its netns, and takes far less than `min_age`).
    A record that cannot be read or named is kept."""
    directory = os.path.join(data_dir, DIR, network)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        container_id, sep, ifname = name.partition(":")
        if not sep or (container_id, ifname) in reserved:
            continue
        netns = read(data_dir, network, container_id, ifname)
        try:
            age = time.time() - os.stat(os.path.join(directory, name), follow_symlinks=False).st_mtime
        except OSError:
            continue
        if netns is not None and not os.path.lexists(netns) and age >= min_age:
            found.append(name)
    return found
