"""The IPAM operations, host-local compatible, used in-process by pybridge and by pyipam.

Each takes the whole netconf (as a delegated IPAM plugin receives it) and validates container
ids, ifnames and the network name before any file is touched. One ADD holds one store lock for
all its range sets (host-local locks per range set, so its dual-stack ADD is not atomic).

Error codes (spec codes below 100, plugin codes from 100; the spec leaves 100+ to plugins):
  4    invalid container id or ifname
  5    I/O failure on the store
  7    invalid configuration, naming the field (`invalid field 'ipam.ranges[0][0].subnet'`)
  11   the store lock was not obtained within `lockTimeout`
  50   STATUS: the store cannot be created or written (never for a full range set)
  110  EXHAUSTED: no free IP left in a range set
  111  IP_UNAVAILABLE: a requested IP is taken, is a gateway, or lies in no range set
  112  DUPLICATE_ALLOCATION: this (container id, ifname) already holds an IP in the range set
  113  NOT_FOUND: CHECK found no reservation for (container id, ifname)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Container, Mapping, Set
from typing import Any

from cnikit.ip import IPAddress
from cnikit.spec.args import validate_container_id, validate_ifname
from cnikit.spec.errors import (
    DUPLICATE_ALLOCATION,
    EXHAUSTED,
    INVALID_CONFIG,
    IO_FAILURE,
    IP_UNAVAILABLE,
    NOT_AVAILABLE,
    NOT_FOUND,
    CNIError,
)
from cnikit.spec.names import validate_network_name
from cnikit.spec.version import CURRENT

from .allocator import pick, range_for
from .config import IPAMConfig, Range, RangeSet, load_ipam_config
from .disk import DiskStore, Warn, to_stderr
from .index import Indexes
from .store import Store

__all__ = [
    "DUPLICATE_ALLOCATION",
    "EXHAUSTED",
    "IP_UNAVAILABLE",
    "NOT_FOUND",
    "allocate",
    "ipam_add",
    "ipam_check",
    "ipam_del",
    "ipam_gc",
    "ipam_status",
    "list_reservations",
    "read_resolv_conf",
]


MAX_RESOLV_CONF = 64 * 1024

def _store(cfg: IPAMConfig, warn: Warn, indexes: Indexes | None) -> DiskStore:
    return DiskStore(cfg.data_dir, cfg.network, cfg.lock_timeout, warn, indexes)


def _attachment(container_id: str, ifname: str) -> None:
    validate_container_id(container_id)
    validate_ifname(ifname)


def _set_of(cfg: IPAMConfig, ip: IPAddress) -> int | None:
    """The index of the range set whose pool holds `ip`."""
    return next((i for i, rs in enumerate(cfg.ranges) if range_for(rs, ip) is not None), None)


def _requested_per_set(cfg: IPAMConfig) -> dict[int, IPAddress]:
    """Each requested IP goes to the range set holding it, at most one per set (host-local)."""
    assigned: dict[int, IPAddress] = {}
    leftover: list[str] = []
    for ip in cfg.requested_ips:
        idx = _set_of(cfg, ip)
        if idx is None or idx in assigned:
            leftover.append(str(ip))
        else:
            assigned[idx] = ip
    if leftover:
        raise CNIError(
            IP_UNAVAILABLE, "failed to allocate all requested IPs", ", ".join(leftover)
        )
    return assigned


class _Taken:
    """The store's reserved IPs and this call's picks, without copying the store's set."""

    def __init__(self, held: Container[IPAddress]) -> None:
        self._held = held
        self._picked: set[IPAddress] = set()

    def __contains__(self, ip: object) -> bool:
        return ip in self._picked or ip in self._held

    def add(self, ip: IPAddress) -> None:
        self._picked.add(ip)


def _reserve_in(
    store: Store,
    idx: int,
    range_set: RangeSet,
    reserved: _Taken,
    requested: IPAddress | None,
    attachment: tuple[str, str],
) -> tuple[IPAddress, Range]:
    last = store.last_reserved_ip(idx)
    while True:
        ip, r = pick(range_set, reserved, last, requested)
        reserved.add(ip)
        if store.reserve(ip, *attachment, idx):
            return ip, r
        # Taken by a writer that ignores the lock; the next pick skips it.


def allocate(
    store: Store, cfg: IPAMConfig, container_id: str, ifname: str
) -> list[tuple[IPAddress, Range]]:
    """One IP per range set under one lock, all or nothing."""
    requested = _requested_per_set(cfg)
    with store.lock():
        holdings = store.holdings()
        # Stricter than host-local, which checks this only when no IP is requested.
        for ip in holdings.exact(container_id, ifname):
            if _set_of(cfg, ip) is not None:
                raise CNIError(
                    DUPLICATE_ALLOCATION,
                    "duplicate allocation is not allowed",
                    f"{ip} has been allocated to {container_id}/{ifname}",
                )
        reserved = _Taken(holdings.ips)
        done: list[tuple[IPAddress, Range]] = []
        try:
            for idx, range_set in enumerate(cfg.ranges):
                done.append(
                    _reserve_in(
                        store, idx, range_set, reserved, requested.get(idx), (container_id, ifname)
                    )
                )
        except BaseException:
            for ip, _ in done:
                # The error that stopped the ADD matters more than a failed undo.
                with contextlib.suppress(CNIError):
                    store.release(ip)
            raise
    return done


def read_resolv_conf(path: str) -> dict[str, Any]:
    """The `dns` of a result from a resolv.conf, as host-local parses it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_RESOLV_CONF)
    except OSError as exc:
        raise CNIError(
            INVALID_CONFIG, "invalid field 'ipam.resolvConf'", f"{path}: {exc.strerror or exc}"
        ) from exc
    nameservers: list[str] = []
    domain = ""
    search: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith(("#", ";")):
            continue
        key, values = fields[0], fields[1:]
        if key == "nameserver":
            nameservers.append(values[0])
        elif key == "domain":
            domain = values[0]
        elif key == "search":
            search.extend(values)
        elif key == "options":
            options.extend(values)
    dns = {"nameservers": nameservers, "domain": domain, "search": search, "options": options}
    return {key: value for key, value in dns.items() if value}


def ipam_add(
    netconf: Mapping[str, Any], container_id: str, ifname: str, cni_args: Mapping[str, str],
    warn: Warn = to_stderr, indexes: Indexes | None = None,
) -> dict[str, Any]:
    """Reserve one IP per range set; the result is 1.1.0-shaped (convert it for the caller)."""
    _attachment(container_id, ifname)
    cfg = load_ipam_config(netconf, cni_args)
    dns = read_resolv_conf(cfg.resolv_conf) if cfg.resolv_conf else None
    allocated = allocate(_store(cfg, warn, indexes), cfg, container_id, ifname)
    result: dict[str, Any] = {
        "cniVersion": CURRENT,
        "ips": [
            {"address": f"{ip}/{r.subnet.prefixlen}", "gateway": str(r.gateway)}
            for ip, r in allocated
        ],
    }
    if cfg.routes:
        result["routes"] = [route.to_result() for route in cfg.routes]
    if dns:
        result["dns"] = dns
    return result


def ipam_del(netconf: Mapping[str, Any], container_id: str, ifname: str, warn: Warn = to_stderr,
             indexes: Indexes | None = None) -> list[str]:
    """Release what (container id, ifname) holds; an unknown attachment is not an error."""
    _attachment(container_id, ifname)
    store = _store(load_ipam_config(netconf, {}), warn, indexes)
    if not store.exists():
        return []
    with store.lock():
        return [str(ip) for ip in store.release_by_id(container_id, ifname)]


def ipam_check(netconf: Mapping[str, Any], container_id: str, ifname: str, warn: Warn = to_stderr,
               indexes: Indexes | None = None) -> None:
    _attachment(container_id, ifname)
    store = _store(load_ipam_config(netconf, {}), warn, indexes)
    found = False
    if store.exists():
        with store.lock():
            found = bool(store.get_by_id(container_id, ifname))
    if not found:
        raise CNIError(
            NOT_FOUND,
            f"failed to find address added by container {container_id}",
            f"no reservation for {container_id}/{ifname} in {store.path}",
        )


def ipam_status(netconf: Mapping[str, Any], warn: Warn = to_stderr, indexes: Indexes | None = None) -> None:
    """Ready for ADD as far as this node goes: the store can be locked and written. A full range
    set is not a STATUS failure: containerd 2.x turns any STATUS error into NetworkReady=false,
    kubelet marks the node NotReady and its pods are evicted; a full pool only stops the next
    ADD, which fails with EXHAUSTED naming the range set and its use."""
    cfg = load_ipam_config(netconf, {})
    store = _store(cfg, warn, indexes)
    try:
        with store.lock():
            store.probe_writable()
    except CNIError as exc:
        if exc.code != IO_FAILURE:
            raise
        raise CNIError(NOT_AVAILABLE, exc.msg, exc.details) from exc


def ipam_gc(netconf: Mapping[str, Any], valid: Set[tuple[str, str]], warn: Warn = to_stderr,
            indexes: Indexes | None = None, released_to: Callable[[str, int], None] | None = None,
            ) -> list[str]:
    """Release every reservation whose attachment is not in `valid` (a legacy id-only one if its
    id is in no valid pair); returns the released IPs, and tells `released_to` (the agent's
    metrics) the network and their count. Keeps going past a failed release and raises one error
    naming them all at the end."""
    cfg = load_ipam_config(netconf, {})
    store = _store(cfg, warn, indexes)
    if not store.exists():
        return []
    valid_ids = {container_id for container_id, _ in valid}
    released: list[str] = []
    errors: list[str] = []
    with store.lock():
        for r in store.reservations():
            if r.ifname is None and r.container_id in valid_ids:
                continue
            if (r.container_id, r.ifname) in valid:
                continue
            try:
                store.release(r.ip)
            except CNIError as exc:
                errors.append(str(exc))
            else:
                released.append(str(r.ip))
    if released_to is not None:
        released_to(cfg.network, len(released))
    if errors:
        raise CNIError(IO_FAILURE, "failed to release some reservations", "; ".join(errors))
    return released


def _networks(data_dir: str) -> list[str]:
    try:
        entries = list(os.scandir(data_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CNIError(IO_FAILURE, "cannot list the data directory", f"{data_dir}: {exc}") from exc
    names = []
    for entry in entries:
        with contextlib.suppress(CNIError):
            if entry.is_dir(follow_symlinks=False):
                names.append(validate_network_name(entry.name))
    return sorted(names)


def list_reservations(data_dir: str, network: str | None = None) -> list[tuple[str, str, str, str]]:
    """(network, ip, container id, ifname) for `pyipam ls`; ifname is "" for legacy files."""
    names = [validate_network_name(network)] if network is not None else _networks(data_dir)
    rows: list[tuple[str, str, str, str]] = []
    for name in names:
        store = DiskStore(data_dir, name)
        if not store.exists():
            continue
        with store.lock():
            held = store.reservations()
        held.sort(key=lambda r: (r.ip.version, int(r.ip)))
        rows.extend((name, str(r.ip), r.container_id, r.ifname or "") for r in held)
    return rows
