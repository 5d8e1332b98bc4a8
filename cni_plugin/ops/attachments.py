"""Every attachment on the node, joined from the IPAM stores and the kernel (`pybridge ls`).

Stores: each network of the conf dir whose IPAM keeps a host-local store. Kernel: the veths on
each such network's bridge, their peer found in the named netns (/run/netns) through the peer's
netns id, with its name and addresses read inside that netns. A reservation is matched to a veth
by address. The netns path is pybridge's own record (`nsrecord`), else libcni's cache (`netns` of
cniCacheV1, libcni 1.2 and later): a reservation without a veth whose netns no longer exists is
told apart as "netns gone", and a veth whose peer is in no named netns (containerd's pins under
its state dir) is read through the recorded paths.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cnikit.spec.errors import CNIError
from ipam.config import IPAMConfig

from .. import netns, nsrecord, rtnl
from ..netlink import NetlinkError
from . import networks

OK = "ok"
NO_VETH = "reservation without veth"
NO_RESERVATION = "veth without reservation"
NETNS_GONE = "netns gone"
NETNS_DIR = "/run/netns"


@dataclass
class Attachment:
    network: str
    container_id: str
    ifname: str
    addresses: list[str]
    host_veth: str
    netns: str
    age_seconds: int | None
    state: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PodLink:
    """A veth on a bridge and what its peer looks like inside its netns."""

    host_veth: str
    netns: str = ""
    ifname: str = ""
    addresses: tuple[str, ...] = ()


@dataclass
class _Held:
    addresses: list[str] = field(default_factory=list)
    oldest: float | None = None


def _netns_names() -> dict[int, str]:
    """Netns id (as this netns knows it) -> name, for the named netns that have one (as
    `ip netns list` shows them)."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except OSError:
        return {}
    found: dict[int, str] = {}
    with rtnl.Socket() as sock:
        for name in names:
            try:
                fd = netns.open_netns(os.path.join(NETNS_DIR, name))
            except (netns.NetnsGone, CNIError):
                continue
            try:
                nsid = sock.nsid(fd)
            except NetlinkError:
                nsid = None
            finally:
                os.close(fd)
            if nsid is not None:
                found.setdefault(nsid, name)
    return found


def _addresses(sock: rtnl.Socket, index: int) -> tuple[str, ...]:
    return tuple(str(a.ip) for a in sock.global_addresses(index))


def _peer(netns_name: str, index: int) -> tuple[str, tuple[str, ...]]:
    """(ifname, addresses) of link `index` inside a named netns; ("", ()) if it cannot be read."""

    def read() -> tuple[str, tuple[str, ...]]:
        with rtnl.Socket() as sock:
            link = sock.link_by_index(index)
            return (link.name, _addresses(sock, index)) if link is not None else ("", ())

    try:
        fd = netns.open_netns(os.path.join(NETNS_DIR, netns_name))
    except (netns.NetnsGone, CNIError):
        return "", ()
    try:
        return netns.run_in(fd, read)
    except OSError:
        return "", ()
    finally:
        os.close(fd)


def _pod_ends(path: str) -> dict[tuple[int, int], PodLink]:
    """(host index, pod index) -> the pod end, of each veth in the netns at `path` whose peer is
    elsewhere; {} if it cannot be read."""

    def read() -> dict[tuple[int, int], PodLink]:
        with rtnl.Socket() as sock:
            return {(link.peer_index, link.index): PodLink("", path, link.name, _addresses(sock, link.index))
                    for link in sock.links()
                    if link.kind == "veth" and link.peer_index and link.peer_netnsid is not None}

    try:
        fd = netns.open_netns(path)
    except (netns.NetnsGone, CNIError):
        return {}
    try:
        return netns.run_in(fd, read)
    except OSError:
        return {}
    finally:
        os.close(fd)


def pod_links(bridges: Iterable[str], netns_paths: Iterable[str] = ()) -> dict[str, list[PodLink]]:
    """Bridge name -> the veths on it, each with its peer as found in the named netns, else in
    one of `netns_paths` (read only when some peer is in no named netns)."""
    wanted = set(bridges)
    found: dict[str, list[PodLink]] = {b: [] for b in wanted}
    with rtnl.Socket() as sock:
        links = sock.links()
    by_index = {link.index: link for link in links}
    names, ends = None, None
    for link in links:
        nsid = link.peer_netnsid
        master = by_index.get(link.master) if link.master else None
        bridge = master.name if master is not None else None
        if bridge not in wanted or link.kind != "veth":
            continue
        peer = link.peer_index
        if names is None:
            names = _netns_names()
        where = names.get(nsid, "") if nsid is not None else ""
        ifname, addresses = _peer(where, peer) if where and peer else ("", ())
        if not where and peer:
            if ends is None:
                ends = {key: end for path in set(netns_paths) for key, end in _pod_ends(path).items()}
            end = ends.get((link.index, peer))
            if end is not None:
                where, ifname, addresses = end.netns, end.ifname, end.addresses
        found[bridge].append(PodLink(link.name, where, ifname, addresses))
    return found


def _held(cfg: IPAMConfig) -> dict[tuple[str, str], _Held]:
    """(container id, ifname) -> its reserved addresses and the oldest reservation's mtime."""
    store = networks.open_store(cfg)
    held: dict[tuple[str, str], _Held] = defaultdict(_Held)
    if not store.exists():
        return held
    with store.lock():
        reservations = store.reservations()
    for r in sorted(reservations, key=lambda r: (r.ip.version, int(r.ip))):
        entry = held[(r.container_id, r.ifname or "")]
        entry.addresses.append(str(r.ip))
        try:
            mtime = os.stat(os.path.join(store.path, str(r.ip)), follow_symlinks=False).st_mtime
        except OSError:
            continue
        entry.oldest = mtime if entry.oldest is None else min(entry.oldest, mtime)
    return held


def _cached_netns(cache_dir: str, network: str, container_id: str, ifname: str) -> str | None:
    """The netns path libcni's cache recorded for the attachment, if it recorded a plausible one."""
    path = os.path.join(cache_dir, f"{network}-{container_id}-{ifname}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            cached = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    value = cached.get("netns") if isinstance(cached, dict) else None
    return value if isinstance(value, str) and nsrecord.plausible(value) else None


def _netns_of(cfg: IPAMConfig, cache_dir: str, container_id: str, ifname: str) -> str | None:
    """pybridge's own record of the attachment's netns path, else libcni's."""
    return nsrecord.read(cfg.data_dir, cfg.network, container_id, ifname) \
        or _cached_netns(cache_dir, cfg.network, container_id, ifname)


Cached = dict[tuple[str, str, str], str | None]  # (network, container id, ifname) -> netns path


def _reserved_rows(network: str, held: dict[tuple[str, str], _Held], links: list[PodLink], cached: Cached,
                   now: float) -> tuple[list[Attachment], set[str]]:
    by_address = {address: link for link in links for address in link.addresses}
    rows, matched = [], set()
    for (container_id, ifname), entry in sorted(held.items()):
        link = next((by_address[a] for a in entry.addresses if a in by_address), None)
        age = int(now - entry.oldest) if entry.oldest is not None else None
        if link is not None:
            matched.add(link.host_veth)
            rows.append(Attachment(network, container_id, ifname, entry.addresses, link.host_veth,
                                   link.netns, age, OK))
            continue
        path = cached.get((network, container_id, ifname))
        gone = path is not None and not os.path.exists(path)
        rows.append(Attachment(network, container_id, ifname, entry.addresses, "", path or "", age,
                               NETNS_GONE if gone else NO_VETH))
    return rows, matched


def collect(confs: list[networks.Conf], cache_dir: str = networks.DEFAULT_CACHE_DIR) -> list[Attachment]:
    found = networks.stores(confs)
    bridges = {conf.bridge for conf, _ in found if conf.bridge}
    held = {cfg.network: _held(cfg) for _, cfg in found}
    cached = {(cfg.network, cid, ifname): _netns_of(cfg, cache_dir, cid, ifname)
              for _, cfg in found for cid, ifname in held[cfg.network]}
    links = pod_links(bridges, [path for path in cached.values() if path is not None])
    now = time.time()
    rows: list[Attachment] = []
    matched: dict[str, set[str]] = defaultdict(set)
    for conf, cfg in found:
        on_bridge = links.get(conf.bridge or "", [])
        reserved, veths = _reserved_rows(cfg.network, held[cfg.network], on_bridge, cached, now)
        rows += reserved
        matched[conf.bridge or ""] |= veths
    first_network: dict[str, str] = {}
    for conf, cfg in found:
        first_network.setdefault(conf.bridge or "", cfg.network)
    for bridge, network in first_network.items():
        for link in links.get(bridge, []):
            if link.host_veth not in matched[bridge]:
                rows.append(Attachment(network, "", link.ifname, list(link.addresses), link.host_veth,
                                       link.netns, None, NO_RESERVATION))
    return rows


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(rows: list[Attachment]) -> str:
    lines = [("NETWORK", "CONTAINER", "IFNAME", "ADDRESSES", "VETH", "NETNS", "AGE", "STATE")]
    lines += [(r.network, r.container_id[:12] or "-", r.ifname or "-", ",".join(r.addresses) or "-",
               r.host_veth or "-", r.netns or "-", _age(r.age_seconds), r.state) for r in rows]
    widths = [max(len(line[col]) for line in lines) for col in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
