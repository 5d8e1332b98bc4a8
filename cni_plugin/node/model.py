"""The node controller's decisions, pure: Node objects in, the conflist, routes and masquerade out.

Nothing here talks to the API server or the kernel (kube.py and effects.py do), so every rule
of the reconcile is unit tested on plain data:
- the own node's spec.podCIDRs (one per family, dual-stack) become the conflist's IPAM ranges;
  without them the agent waits and writes nothing;
- a podCIDR counts only inside the configured cluster CIDRs (none configured: nothing counts,
  the agent waits) and never as a default route: a Node object cannot claim the LAN or the
  internet, for routing or masquerade;
- every other node's podCIDRs are routed via that node's InternalIP of the same family, unless
  a route the agent does not own already has that destination (never replaced);
  routes of nodes that left (or whose address changed) are removed;
- traffic from this node's pods to anything outside the cluster CIDRs is masqueraded,
  multicast excepted;
- the conflist's cniVersion is one the node's runtime accepts (cni_version) and every plugin of
  the chain supports (chain_version: portmap is asked with VERSION; a step down is noted);
- a pod CIDR with fewer addresses than the node's maxPods is noted.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnikit.ip import IPAddress, IPNetwork
from cnikit.spec.version import SUPPORTED
from ipam.config import Range, pool_size

from .. import chain, hostnet

Network = IPNetwork  # the names this package's models use
Address = IPAddress

CONFLIST_NAME = "10-pybridge.conflist"
NFT_TABLE = "pybridge_node"  # inet family; the plugin's own per-pod table is `inet pybridge`
AUTO = "auto"
CNI_VERSIONS = SUPPORTED  # what cniVersion the written conflist may name
CHAINED = ("portmap",)  # the plugins after pybridge in the written conflist


@dataclass(frozen=True)
class Node:
    name: str
    internal_ips: tuple[Address, ...] = ()
    pod_cidrs: tuple[Network, ...] = ()
    runtime_version: str = ""  # status.nodeInfo.containerRuntimeVersion, "containerd://1.7.24"
    problems: tuple[str, ...] = ()  # "field: why" of each entry skipped when it was read
    max_pods: int | None = None  # status.capacity.pods

    def internal_ip(self, version: int) -> Address | None:
        return next((ip for ip in self.internal_ips if ip.version == version), None)


class Malformed(ValueError):
    """An API object the agent cannot use at all (not an object, no name)."""


@dataclass(frozen=True, order=True)
class Refusal:
    """Something the agent declined to do, and why (logged and counted once per change)."""

    reason: str  # a fixed word: "malformed", "outside-cluster", "default-route", "route-conflict"
    subject: str  # the node (and field) it concerns
    detail: str


@dataclass(frozen=True, order=True)
class Route:
    dst: str  # canonical network, "10.244.2.0/24"
    gateway: str  # canonical address


@dataclass(frozen=True)
class Settings:
    node_name: str
    cluster_cidrs: tuple[Network, ...] = ()
    network: str = "pybridge"
    bridge: str = "pyb0"
    ipam_data_dir: str = "/run/cni-ipam-state"
    cni_version: str = AUTO  # or one of CNI_VERSIONS
    log_file: str | None = None


@dataclass
class Desired:
    """What the node should look like; `waiting` says why nothing may be written yet."""

    waiting: str | None = None
    conflist: dict[str, Any] | None = None
    routes: frozenset[Route] = frozenset()
    route_deletes: frozenset[Route] = frozenset()
    route_sets: frozenset[Route] = frozenset()
    masquerade: str | None = None  # nft script, applied as one transaction
    notes: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


def _network(text: Any) -> Network | None:
    try:
        return ipaddress.ip_network(str(text), strict=True)
    except ValueError:
        return None


def _address(text: Any) -> Address | None:
    """An address without a zone: `fd00::9%x` would reach nft and ip as text neither takes."""
    try:
        address = ipaddress.ip_address(str(text))
    except ValueError:
        return None
    return None if getattr(address, "scope_id", None) else address


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def node_from_object(obj: Any) -> Node:
    """A Node in the API's JSON form (camelCase, as served or recorded). Entries it cannot use
    are skipped and named in `problems`; Malformed if it has no name at all."""
    meta, spec, status = (_mapping(_mapping(obj).get(k)) for k in ("metadata", "spec", "status"))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise Malformed("metadata.name: missing")
    problems = []
    raw_cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    cidrs = []
    for i, raw in enumerate(_sequence(raw_cidrs)):
        network = _network(raw)
        if network is None:
            problems.append(f"spec.podCIDRs[{i}]: {str(raw)[:60]!r} is not a network")
        else:
            cidrs.append(network)
    ips = []
    for i, entry in enumerate(_sequence(status.get("addresses"))):
        if _mapping(entry).get("type") != "InternalIP":
            continue
        address = _address(entry.get("address"))
        if address is None:
            problems.append(f"status.addresses[{i}].address: {str(entry.get('address'))[:60]!r} "
                            "is not an address without a zone")
        else:
            ips.append(address)
    runtime = _mapping(status.get("nodeInfo")).get("containerRuntimeVersion")
    pods = str(_mapping(status.get("capacity")).get("pods", ""))
    return Node(name=name, internal_ips=tuple(ips), pod_cidrs=tuple(cidrs),
                runtime_version=runtime if isinstance(runtime, str) else "", problems=tuple(problems),
                max_pods=int(pods) if pods.isdigit() and len(pods) < 10 else None)


def refusal(cidr: Network, cluster: Iterable[Network]) -> str | None:
    """Why a podCIDR may not be used (routed, masqueraded for, given to the bridge), or None."""
    if cidr.prefixlen == 0:
        return "default-route"
    if not any(cidr.version == c.version and cidr.subnet_of(c) for c in cluster):  # type: ignore[arg-type]
        return "outside-cluster"
    return None


def cni_version(settings: Settings, own: Node) -> str:
    """The configured cniVersion, or for `auto` the newest the node's runtime takes, read from
    its Node object: containerd 2.x (libcni 1.2+) accepts 1.1.0 and calls STATUS (on every CRI
    Status) only for a 1.1.0 conflist, while containerd 1.6/1.7 (libcni 1.1) reject a 1.1.0
    result outright, so every pod would fail. No runtime calls GC (containerd 1.6, 1.7 and 2.x,
    podman: measured). Any other or unknown runtime gets 1.0.0, which every libcni since 1.0
    accepts. The chain may lower it further (chain_version)."""
    if settings.cni_version != AUTO:
        return settings.cni_version
    runtime, _, version = own.runtime_version.partition("://")
    major = version.split(".", 1)[0]
    return "1.1.0" if runtime == "containerd" and major.isdigit() and int(major) >= 2 else "1.0.0"


def chain_version(ceiling: str, probes: Sequence[chain.Probe]) -> tuple[str | None, list[str]]:
    """The newest cniVersion up to `ceiling` that pybridge and every probed plugin of the chain
    support, and notes naming the plugins that forced a step down or could not be asked (those
    do not lower it: nothing says what they take). None: no version all of them take."""
    chosen = chain.newest_common(ceiling, probes, CNI_VERSIONS)
    notes = [f"chained plugin {p.describe()}" for p in probes if p.versions is None]
    if chosen != ceiling:
        forcing = "; ".join(p.describe() for p in probes if p.takes(ceiling) is False)
        notes.append(f"cniVersion {chosen or 'none'} instead of {ceiling}: {forcing}")
    return chosen, notes


def pod_cidr_notes(own: Node) -> list[str]:
    """Pod CIDRs too small for the node's maxPods: pods past the pool's size fail at ADD (code 110)."""
    if own.max_pods is None:
        return []
    notes = []
    for cidr in own.pod_cidrs:
        size = pool_size(((Range.model_validate({"subnet": str(cidr)}),),))
        if size < own.max_pods:
            notes.append(f"pod CIDR {cidr} holds {size} pod addresses, fewer than the node's maxPods "
                         f"{own.max_pods} (status.capacity.pods): ADDs past {size} pods fail with code 110")
    return notes


def desired_routes(me: str, nodes: Iterable[Node], cluster: Iterable[Network],
                   refused: list[Refusal] | None = None) -> frozenset[Route]:
    """Routes to the other nodes' podCIDRs; each one refused (outside `cluster`, a default
    route) is added to `refused`."""
    nodes, cluster = list(nodes), list(cluster)
    own = [c for n in nodes if n.name == me for c in n.pod_cidrs]
    routes = set()
    for node in nodes:
        if node.name == me:
            continue
        for cidr in node.pod_cidrs:
            why = refusal(cidr, cluster)
            if why is not None:
                if refused is not None:
                    refused.append(Refusal(why, f"node {node.name!r} podCIDR {cidr}", "not routed"))
                continue
            gateway = node.internal_ip(cidr.version)
            if gateway is None or any(cidr.overlaps(o) for o in own if o.version == cidr.version):
                continue  # no address of that family, or a CIDR clashing with ours: never route it
            routes.add(Route(str(cidr), str(gateway)))
    return frozenset(routes)


def route_changes(
    current: Iterable[Route], desired: frozenset[Route]
) -> tuple[frozenset[Route], frozenset[Route]]:
    """(routes to delete, routes to set) to go from `current` (ours only) to `desired`.

    A destination that moved to another gateway is only replaced, never deleted: deleting the old
    (dst, gateway) after the replace would find nothing, and deleting before would open a gap.
    """
    current = frozenset(current)
    wanted_dsts = {r.dst for r in desired}
    deletes = frozenset(r for r in current if r.dst not in wanted_dsts)
    sets = frozenset(desired - current)
    return deletes, sets


def without_foreign(desired: frozenset[Route], current: Iterable[Route], foreign: Iterable[str],
                    refused: list[Refusal]) -> frozenset[Route]:
    """`desired` less the destinations a route the agent does not own holds (each one refused):
    the admin's route (a LAN, a VPN) is never replaced."""
    taken = set(foreign) - {r.dst for r in current}
    refused.extend(Refusal("route-conflict", f"route {r.dst}",
                           f"a route not the agent's has it: not via {r.gateway}")
                   for r in sorted(desired) if r.dst in taken)
    return frozenset(r for r in desired if r.dst not in taken)


def conflist(settings: Settings, own: Node, mtu: int | None, version: str | None = None) -> dict[str, Any]:
    """pybridge (gateway + default route per family, hairpin for Services) chained to portmap,
    at `version` (default: cni_version)."""
    ranges = [[{"subnet": str(c)}] for c in sorted(own.pod_cidrs, key=lambda n: n.version)]
    plugin: dict[str, Any] = {
        "type": "pybridge",
        "bridge": settings.bridge,
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": False,  # the node controller masquerades for the whole node (masquerade_script)
        "hairpinMode": True,
        "ipam": {"type": "pyipam", "dataDir": settings.ipam_data_dir, "ranges": ranges},
    }
    if mtu:
        plugin["mtu"] = mtu
    if settings.log_file:
        plugin["logFile"] = settings.log_file
    return {
        "cniVersion": version or cni_version(settings, own),
        "name": settings.network,
        "plugins": [plugin, {"type": CHAINED[0], "capabilities": {"portMappings": True}, "snat": True}],
    }


def render_conflist(conf: Mapping[str, Any]) -> bytes:
    return (json.dumps(conf, indent=2, sort_keys=False) + "\n").encode()


def masquerade_script(own: Iterable[Network], no_masquerade: Iterable[Network]) -> str:
    """One nft transaction replacing the agent's own table (add + delete makes it idempotent)."""
    own = sorted(set(own), key=lambda n: (n.version, n))
    keep = set(no_masquerade)
    lines = [f"add table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}", f"table inet {NFT_TABLE} {{",
             "\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
    for version, family in ((4, "ip"), (6, "ip6")):
        sources = [n for n in own if n.version == version]
        if not sources:
            continue
        multicast = ipaddress.ip_network(hostnet.MULTICAST[version])
        dests = sorted({n for n in keep if n.version == version} | {multicast}, key=str)
        lines.append(f"\t\t{family} saddr {{ {', '.join(map(str, sources))} }} "
                     f"{family} daddr != {{ {', '.join(map(str, dests))} }} masquerade")
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def desired(settings: Settings, nodes: Iterable[Node], current_routes: Iterable[Route],
         mtu: int | None, foreign_routes: Iterable[str] = (), chained: Sequence[chain.Probe] = ()) -> Desired:
    """`current_routes`: the agent's own routes now; `foreign_routes`: the destinations of every
    other route of the main table; `chained`: what the plugins of CHAINED answered to VERSION
    (none asked: the runtime's pick)."""
    nodes = list(nodes)
    own = next((n for n in nodes if n.name == settings.node_name), None)
    if own is None:
        return Desired(waiting=f"node {settings.node_name!r} not found")
    if not own.pod_cidrs:
        return Desired(waiting=f"node {settings.node_name!r} has no podCIDRs assigned yet")
    if not settings.cluster_cidrs:
        return Desired(waiting="no cluster CIDR configured (--cluster-cidr, env POD_SUBNET): "
                            "no podCIDR is routed or used")
    bad = [f"{c} ({why})" for c in own.pod_cidrs if (why := refusal(c, settings.cluster_cidrs))]
    if bad:
        return Desired(waiting=f"node {settings.node_name!r} podCIDRs {', '.join(bad)}: "
                            f"not inside the cluster CIDRs {', '.join(map(str, settings.cluster_cidrs))}")
    version, version_notes = chain_version(cni_version(settings, own), chained)
    if version is None:  # every pod would fail at the plugin that rejects it: write nothing
        return Desired(waiting="; ".join(version_notes), notes=version_notes)
    refused: list[Refusal] = []
    current_routes = frozenset(current_routes)
    routes = desired_routes(settings.node_name, nodes, settings.cluster_cidrs, refused)
    routes = without_foreign(routes, current_routes, foreign_routes, refused)
    deletes, sets = route_changes(current_routes, routes)
    result = Desired(conflist=conflist(settings, own, mtu, version), routes=routes, route_deletes=deletes,
                  route_sets=sets, masquerade=masquerade_script(own.pod_cidrs, settings.cluster_cidrs),
                  refused=refused, notes=version_notes + pod_cidr_notes(own))
    for node in nodes:
        if node.name != settings.node_name and node.pod_cidrs and not node.internal_ips:
            result.notes.append(f"node {node.name!r} has podCIDRs but no InternalIP: not routed")
    return result
