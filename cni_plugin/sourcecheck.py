"""Each bridge port speaks only as its pod (`sourceCheck`): nftables in the bridge family, one
chain per attachment (network, container id, ifname), as masquerade keys its rules.

`table bridge pybridge` (beside masq's `table inet pybridge`): base chain `prerouting`, hooked
where every frame from a port enters the bridge, before br_netfilter, forwarding and delivery to
the host, looks the ingress port up in map `ports` (host veth name -> goto the attachment's
chain). A port not in the map (another plugin's, or a network with the check off) passes. The
attachment's chain, named by masq's tag (hashes only), drops from its port:
- router advertisements, redirects and neighbour advertisements with the router flag: a pod is
  never a router, and a rogue RA would take other pods' IPv6 (the class of CVE-2020-10749);
- frames whose Ethernet source is not the pod's MAC;
- with addresses from IPAM: ether types of a family the pod has no address in, ARP whose sender
  is not the pod's MAC and IPv4, IPv4 and IPv6 from any source but the pod's own: its addresses,
  its EUI-64 link-local (the pod end's addr_gen_mode is set so) and `::` for the neighbour
  solicitations of DAD and the MLD reports sent before a link-local address exists.

The chain and its map element are written in one transaction, so a port is never half checked.
ADD sends it as one nfnetlink batch (nfbatch.py): the chain, its rules as the messages nft sends
for their text (nfexpr.py) and the element, without nft parsing text and filling its cache first
(p50 1.3-1.7 ms against 2.4-3.7 ms through libnftables over 200 chains, docs/performance.md).
Only when the kernel refuses it for a miss (ENOENT: no table or map yet; EEXIST: a retried ADD's
chain left over) does it list and rewrite what it needs through nft, as masq does; where the
socket fails, nft's one run of the same text. DEL sends one nfnetlink batch too (nft would fill
its cache first, ~15 ms), given the port it verified is the pod's (link.verified_host_end);
else, or when the kernel refuses, it lists. Through the agent that batch goes after DEL's
answer, with every other DEL's queued by then (Teardowns: the kernel's commit of deletions is
what costs, ~7-15 ms a batch). nft runs in-process through libnftables where present (nft.py:
~1.5 ms, not ~15 ms per run), else exec'd.
"""

from __future__ import annotations

import errno
import re
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

from cnikit.ip import IPInterface
from cnikit.spec.errors import INVALID_CONFIG, SOURCE_CHECK_FAILED, CNIError
from cnikit.spec.names import validate_network_name

from . import hostnet, masq, nfbatch, nfexpr, rtnl
from . import nft as nftables
from .netlink import NetlinkError
from .nfexpr import Rule, Test

_TABLE = "bridge pybridge"
_BASE_MARK = "pybridge base v1"
_BASE = f"""add table {_TABLE}
add chain {_TABLE} prerouting {{ type filter hook prerouting priority -200; policy accept; }}
add map {_TABLE} ports {{ type ifname : verdict; }}
flush chain {_TABLE} prerouting
add rule {_TABLE} prerouting iifname vmap @ports comment "{_BASE_MARK}"
"""
_ROUTER_ND = (
    Rule((Test("icmpv6 type", ("nd-router-advert", "nd-redirect"), braces=True),), "drop"),
    # the R (router) flag
    Rule((Test("icmpv6 type", ("nd-neighbor-advert",)), Test("@th,32,1", ("1",))), "drop"),
)
_DAD = ("nd-neighbor-solicit", "mld-listener-report", "mld2-listener-report")
# The fast path missed: no table or map yet, or this attachment's chain is still there.
_MISS = ("No such file or directory", "File exists")
_MISS_ERRNO = (errno.ENOENT, errno.EEXIST)
_PORT = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# linux/netfilter/nf_tables.h: what only this module encodes (what others do too: nfbatch.py)
NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_DELRULE = 3, 5, 8
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3


def _fail(what: str, exc: nftables.NftError) -> CNIError:
    return CNIError(SOURCE_CHECK_FAILED, f"source check {what} failed", exc.details)


def chain_name(network: str, container_id: str, ifname: str) -> str:
    return masq.attachment_tag(network, container_id, ifname).replace(":", "_")


def _network_prefix(network: str) -> str:
    return masq.network_prefix(network).replace(":", "_")


def link_local(mac: str) -> IPv6Address:
    """The EUI-64 link-local address the kernel gives a link with this MAC (addr_gen_mode 0)."""
    b = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([b[0] ^ 0x02]) + b[1:3] + b"\xff\xfe" + b[3:]
    return IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def port_rules(mac: str, addrs: Sequence[IPInterface], ipv6: bool) -> list[Rule]:
    """The attachment chain's rules. `ipv6`: IPv6 is on on the pod end (its link-local counts)."""
    rules = [Rule((Test("ether saddr", (mac,), negated=True),), "drop"), *_ROUTER_ND]
    if not addrs:  # no IPAM: the pod's addresses are not ours to know
        return rules
    own = {str(link_local(mac))} if ipv6 else set()
    v4 = tuple(sorted({str(a.ip) for a in addrs if a.version == 4}))
    v6 = tuple(sorted({str(a.ip) for a in addrs if a.version == 6} | own))
    types = (("ip", "arp") if v4 else ()) + (("ip6",) if v6 else ())
    rules.append(Rule((Test("ether type", types, negated=True, braces=True),), "drop"))
    if v4:
        rules += [Rule((Test("arp saddr ether", (mac,), negated=True),), "drop"),
                  Rule((Test("arp saddr ip", v4, negated=True, braces=True),), "drop"),
                  Rule((Test("ip saddr", v4, negated=True, braces=True),), "drop")]
    if v6:
        rules += [Rule((Test("ip6 saddr", ("::",)), Test("icmpv6 type", _DAD, braces=True)), "return"),
                  Rule((Test("ip6 saddr", v6, negated=True, braces=True),), "drop")]
    return rules


def _port_script(chain: str, port: str, rules: list[Rule]) -> str:
    return "".join(f"add rule {_TABLE} {chain} {rule}\n" for rule in rules) + (
        f'add element {_TABLE} ports {{ "{port}" : goto {chain} }}\n')


def _port_creation(chain: str, port: str, rules: list[Rule]) -> list[nfbatch.Message]:
    """What nft sends for `create chain`, the rules (nfexpr.py) and `add element ... ports
    { port : goto chain }`."""
    family, table = _TABLE.split()
    goto = nfbatch.verdict_data(nfbatch.NFTA_SET_ELEM_DATA, nfbatch.NFT_GOTO, chain)
    return [
        nfbatch.message(NFT_MSG_NEWCHAIN, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL | rtnl.NLM_F_ACK, family,
                        nfbatch.name(NFTA_CHAIN_TABLE, table), nfbatch.name(NFTA_CHAIN_NAME, chain)),
        *nfexpr.rule_messages(family, table, chain, rules),
        # by name only: a set id would name this batch's anonymous sets
        nfbatch.set_elements(family, table, "ports", [nfbatch.element(nfbatch.ifname(port), goto)]),
    ]


def setup(network: str, container_id: str, ifname: str, port: str, mac: str,
          addrs: Sequence[IPInterface], ipv6: bool) -> None:
    """Filter what host port `port` lets in to what the pod owns; replaces what this attachment
    had (a retried ADD's chain and element)."""
    masq.validate_attachment(network, container_id, ifname)
    if not _PORT.fullmatch(port) or not _MAC.fullmatch(mac) or any(
            not isinstance(a, IPInterface) or getattr(a, "scope_id", None) for a in addrs):
        raise CNIError(INVALID_CONFIG, "invalid port for the source check", f"{port!r} {mac!r}"[:100])
    chain = chain_name(network, container_id, ifname)
    rules = port_rules(mac, addrs, ipv6)
    if not _have_nft():
        raise CNIError(SOURCE_CHECK_FAILED, "sourceCheck needs nft",
                       "not in PATH or sbin: install nftables, or set sourceCheck false")
    if not _create_port(chain, port, rules):
        try:
            _replace(lambda c, key: c == chain or key == port,
                     f"add chain {_TABLE} {chain}\nflush chain {_TABLE} {chain}\n"
                     + _port_script(chain, port, rules), base=True, rewrite=chain)
        except nftables.NftError as exc:
            raise _fail("setup", exc) from exc


def _create_port(chain: str, port: str, rules: list[Rule]) -> bool:
    """The chain, its rules and `port`'s element, in one transaction; False where it missed
    (_MISS: no table or map yet, or a retried ADD's chain is there). Sent as nfnetlink messages
    (nfexpr.py: no text to parse, no cache to fill), by nft where the socket fails."""
    try:
        nfbatch.send(_port_creation(chain, port, rules))
        return True
    except NetlinkError as exc:
        if exc.errno in _MISS_ERRNO:
            return False
        raise CNIError(SOURCE_CHECK_FAILED, "source check setup failed", str(exc)) from exc
    except (OSError, struct.error):
        pass  # the socket failed, or an attribute would pass 64 KiB (thousands of addresses)
    try:
        nftables.run(f"create chain {_TABLE} {chain}\n" + _port_script(chain, port, rules), in_process=True)
    except nftables.NftError as exc:
        if not exc.says(_MISS):
            raise _fail("setup", exc) from exc
        return False
    return True


def teardown(network: str, container_id: str, ifname: str, port: str | None = None) -> None:
    """Remove this attachment's chain and map element; nothing to remove is success. `port`:
    its host port as DEL verified it (link.verified_host_end): one nft run, no listing."""
    masq.validate_attachment(network, container_id, ifname)
    chain = chain_name(network, container_id, ifname)
    if _have_nft():
        try:
            if port is None or not _PORT.fullmatch(port) or not _delete_port(chain, port):
                _replace(lambda c, key: c == chain)
        except nftables.NftError as exc:
            raise _fail("teardown", exc) from exc


def _delete_port(chain: str, port: str) -> bool:
    """The element of `port` and `chain`, in one transaction; False where the kernel refused it:
    the element or chain absent, or the chain still the goto of another element (a chain in use
    is kept), so `port`'s element was not this chain's. The listing path then sees what is.
    Sent as nfnetlink messages (nfbatch.py: no nft cache to fill, ~15 ms of a DEL), by nft
    where the socket fails."""
    try:
        nfbatch.send(_port_deletion(chain, port))
        return True
    except NetlinkError:
        return False
    except OSError:
        pass
    try:
        nftables.run(f'delete element {_TABLE} ports {{ "{port}" }}\n'
                     f"flush chain {_TABLE} {chain}\ndelete chain {_TABLE} {chain}\n", in_process=True)
    except nftables.NftError:
        return False
    return True


class Teardowns:
    """Teardowns DEL leaves for after its answer (the agent's removal thread, cnikit/removals.py),
    all those queued then sent as one nfnetlink batch: the kernel's commit of deletions costs
    ~7-15 ms whatever their number (docs/performance.md), and every other nft transaction of the
    node waits for it. Each is the verified port's element, its chain's rules and the chain, as
    `_delete_port`. The kernel commits a batch whole or not at all, so one that would delete what
    an ADD of the same attachment made since is refused: that ADD's element is the chain's goto
    (the chain is in use) and it deleted the old element. The queued ones are then tried one by
    one; one refused alone is left as it is (gone already, by GC or another DEL, or ADDed again;
    a chain whose element went otherwise is GC's). An agent that dies first leaves them to the
    next one's start (`sweep`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, str] = {}  # chain -> its port

    def add(self, network: str, container_id: str, ifname: str, port: str) -> bool:
        """Queue the attachment's teardown; False (nothing queued) where it cannot be done so."""
        masq.validate_attachment(network, container_id, ifname)
        if not _PORT.fullmatch(port) or not _have_nft():
            return False
        with self._lock:
            self._queued[chain_name(network, container_id, ifname)] = port
        return True

    def run(self) -> None:
        with self._lock:
            queued, self._queued = self._queued, {}
        _delete_ports(queued.items())


def _delete_ports(items: Iterable[tuple[str, str]]) -> None:
    """Each (chain, port)'s element and chain, in one batch; else one by one (see Teardowns)."""
    pairs = list(items)
    if not pairs:
        return
    try:
        nfbatch.send([message for chain, port in pairs for message in _port_deletion(chain, port)])
        return
    except NetlinkError:
        if len(pairs) == 1:
            return  # refused alone
    except OSError:
        pass  # the socket failed: _delete_port tries nft
    for chain, port in pairs:
        _delete_port(chain, port)


def sweep(link_names: Callable[[], Collection[str]]) -> None:
    """At an agent's start: the chains of ports the host netns no longer has (their DEL's
    teardown was queued by an agent that died), as Teardowns does. The map is read before the
    links: an ADD's port exists before its element."""
    if not _have_nft():
        return
    try:
        elements = _listing().elements
    except nftables.NftError:
        return  # unreadable: nothing this sweep can do (no table reads as empty)
    names = link_names()
    _delete_ports((chain, port) for port, chain in elements.items()
                  if _PORT.fullmatch(port) and port not in names)


def _port_deletion(chain: str, port: str) -> list[nfbatch.Message]:
    """What nft sends for `delete element ... ports { port }`, `flush chain`, `delete chain`."""
    family, table = _TABLE.split()
    return [
        nfbatch.set_elements(family, table, "ports", [nfbatch.element(nfbatch.ifname(port))], delete=True),
        # without a rule's handle: every rule of the chain
        nfbatch.message(NFT_MSG_DELRULE, rtnl.NLM_F_ACK, family, nfbatch.name(nfbatch.NFTA_RULE_TABLE, table),
                        nfbatch.name(nfbatch.NFTA_RULE_CHAIN, chain)),
        nfbatch.message(NFT_MSG_DELCHAIN, rtnl.NLM_F_ACK, family, nfbatch.name(NFTA_CHAIN_TABLE, table),
                        nfbatch.name(NFTA_CHAIN_NAME, chain)),
    ]


def gc(network: str, valid: set[tuple[str, str]]) -> list[str]:
    """Remove this network's chains whose (container id, ifname) is not in `valid`."""
    validate_network_name(network)
    prefix = _network_prefix(network)
    keep = {chain_name(network, cid, ifname) for cid, ifname in valid}
    if not _have_nft():
        return []
    try:
        _replace(lambda c, key: c.startswith(prefix) and c not in keep)
    except nftables.NftError as exc:
        return [str(_fail("GC", exc))]
    return []


def attachment_has_rules(network: str, container_id: str, ifname: str) -> bool:
    """Whether the attachment's chain is in effect: the base chain hooked, the chain there and a
    port mapped to it. The rules' text is not compared (listing it is slow at scale)."""
    masq.validate_attachment(network, container_id, ifname)
    chain = chain_name(network, container_id, ifname)
    if not _have_nft():
        return False
    try:
        listing = _listing()
    except nftables.NftError as exc:
        raise _fail("listing", exc) from exc
    return listing.hooked and chain in listing.chains and chain in listing.elements.values()


def _have_nft() -> bool:
    return hostnet.find_binary("nft") is not None


@dataclass(frozen=True)
class _Listing:
    chains: set[str]  # the attachments' chains
    elements: dict[str, str]  # port -> chain
    hooked: bool  # the base chain hooked at bridge prerouting, and the map there


def _list(*what: str) -> list[dict[str, Any]] | None:
    """`nft -j list <what>`'s items; None if what it names does not exist."""
    try:
        return nftables.listing(" ".join(("list", *what)), in_process=True)
    except nftables.NftError as exc:
        if exc.says(nftables.GONE):
            return None
        raise


def _listing() -> _Listing:
    """From the chain headers and the map alone: listing rules makes nft read every rule of the
    table (~2 s for one chain at 1000 pods on a loaded 2-vCPU VM), these stay ~30-50 ms."""
    try:
        chains = {c["name"]: c for c in (item["chain"] for item in _list("chains", "bridge") or []
                                         if "chain" in item) if c["table"] == _TABLE.split()[1]}
        ports = next((item["map"] for item in _list("map", *_TABLE.split(), "ports") or []
                      if "map" in item), None)
        elements = {str(key): str(verdict["goto"]["target"]) for key, verdict in (ports or {}).get("elem", [])
                    if isinstance(verdict, dict) and "goto" in verdict}
    except (KeyError, TypeError, ValueError) as exc:
        raise nftables.NftError(f"unexpected JSON listing: {exc}") from exc
    base = chains.pop("prerouting", {})
    hooked = ports is not None and (base.get("type"), base.get("hook"), base.get("prio")) == (
        "filter", "prerouting", -200)
    return _Listing(set(chains), elements, hooked)


def _base_rule_intact() -> bool:
    """The base chain holds exactly our marked rule (by its comment; what it matches is not
    compared). Costly at scale (see _listing): only where ADD's one-run path missed."""
    items = _list("chain", *_TABLE.split(), "prerouting") or []
    return [item["rule"].get("comment") for item in items if "rule" in item] == [_BASE_MARK]


def _replace(drop: Callable[[str, str], bool], add: str = "", base: bool = False,
             rewrite: str = "") -> None:
    """Delete the map elements `drop(chain, port)` selects and the chains `drop(chain, "")`
    selects but `rewrite` (which `add` flushes and fills), and apply `add`, in one transaction;
    with `base`, (re)write the base chain and map unless the listing found them intact."""

    def apply() -> None:
        listing = _listing()
        deletes = "".join(f'delete element {_TABLE} ports {{ "{port}" }}\n'
                          for port, chain in listing.elements.items() if drop(chain, port))
        deletes += "".join(f"flush chain {_TABLE} {chain}\ndelete chain {_TABLE} {chain}\n"
                           for chain in sorted(listing.chains) if drop(chain, "") and chain != rewrite)
        intact = listing.hooked and _base_rule_intact() if base else True
        script = deletes + ("" if intact else _BASE) + add
        if script:
            nftables.run(script, in_process=True)

    try:
        apply()
    except nftables.NftError as exc:
        if not exc.says(nftables.GONE):
            raise
        apply()  # a concurrent DEL or GC went first: list again, once
