"""Outbound masquerade for pod addresses, keyed per attachment (network, container id, ifname).

nftables (preferred): `table inet pybridge`; base chain `postrouting` skips multicast and jumps to
`masq`, which holds one rule per pod address, commented with a tag made of hashes only.
iptables (fallback, the reference plugin's layout): one nat chain per attachment, jumped to from
POSTROUTING. Teardown and GC always look at both backends, so they find rules whatever backend
setup used. Everything runs in the caller's current network namespace.

Only hashes, IP addresses and CIDRs are ever written into a rule.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from collections.abc import Callable, Sequence
from functools import partial

from cnikit import turns
from cnikit.ip import IPInterface
from cnikit.spec.errors import INVALID_CONFIG, INVALID_ENV, MASQ_FAILED, CNIError
from cnikit.spec.names import validate_network_name

from . import hostnet
from . import nft as nftables

NFTABLES = "nftables"
IPTABLES = "iptables"


_TABLE = "inet pybridge"
_IPT_BINARY = {4: "iptables", 6: "ip6tables"}
_NFT_FAMILY = {4: "ip", 6: "ip6"}
_CHAIN_PREFIX = "PYB-"
_CHAIN_LEN = 28  # iptables chain names must be under 29 chars
_TIMEOUT = 30.0  # seconds one iptables run may take
# stderr of a delete whose object is already gone (never set up, or a concurrent DEL/GC won).
_IPT_GONE = ("No chain/target/match by that name", "does a matching rule exist")

# Written whole (flush + add) by a setup that does not find it intact, so concurrent first setups
# converge on one copy of the base chain instead of racing to create it or appending duplicate
# rules. Its rules carry _BASE_MARK: a listing that finds exactly those marked rules there (by
# their comments; what they match is not compared) needs no rewrite, which matters, as a
# transaction that re-adds a chain or deletes rules waits for the kernel (~16 ms on a 2-vCPU VM,
# against ~3 ms for one that only adds a rule).
_BASE_MARK = "pybridge base v1"
_NFT_BASE = f"""add table {_TABLE}
add chain {_TABLE} postrouting {{ type nat hook postrouting priority srcnat; }}
add chain {_TABLE} masq
flush chain {_TABLE} postrouting
add rule {_TABLE} postrouting ip daddr {hostnet.MULTICAST[4]} return comment "{_BASE_MARK}"
add rule {_TABLE} postrouting ip6 daddr {hostnet.MULTICAST[6]} return comment "{_BASE_MARK}"
add rule {_TABLE} postrouting jump masq comment "{_BASE_MARK}"
"""
_BASE_RULES = _NFT_BASE.count(f'comment "{_BASE_MARK}"')


class _Gone(Exception):
    """The rule or chain a command addressed does not exist."""


def setup(
    network: str,
    container_id: str,
    ifname: str,
    addrs: Sequence[IPInterface],
    backend: str | None = None,
) -> None:
    """Masquerade traffic from each address to outside its subnet, except to multicast.

    Replaces the rules this attachment already has on the chosen backend, so a retried ADD
    neither stacks copies nor keeps addresses it no longer has.
    """
    validate_attachment(network, container_id, ifname)
    for addr in addrs:
        # Rules only get the canonical .ip and .network; a scope id ("%<free text>") is refused
        # anyway, as no pod address has one and it would change what the caller meant.
        if not isinstance(addr, IPInterface) or getattr(addr, "scope_id", None):
            raise CNIError(INVALID_CONFIG, "invalid address for masquerade", repr(addr)[:100])
    tag = attachment_tag(network, container_id, ifname)
    if _backend(backend) == NFTABLES:
        rules = "".join(
            f"add rule {_TABLE} masq {_NFT_FAMILY[a.version]} saddr {a.ip}"
            f' {_NFT_FAMILY[a.version]} daddr != {a.network} masquerade comment "{tag}"\n'
            for a in addrs
        )
        _nft_replace(_required("nft"), lambda comment: comment == tag, rules, base=True)
        return
    chain = _chain(network, container_id, ifname)
    for family, binary in _IPT_BINARY.items():
        family_addrs = [a for a in addrs if a.version == family]
        if family_addrs or _binary(binary):
            _ipt_setup(_required(binary), family, chain, tag, family_addrs)


def teardown(network: str, container_id: str, ifname: str) -> None:
    """Remove this attachment's rules from both backends; nothing to remove is success."""
    validate_attachment(network, container_id, ifname)
    tag = attachment_tag(network, container_id, ifname)
    chain = _chain(network, container_id, ifname)
    steps: list[Callable[[], object]] = [partial(_ipt_teardown, ipt, chain) for ipt in _ipts()]
    nft = _binary("nft")
    if nft:
        steps.append(partial(_nft_replace, nft, lambda comment: comment == tag))
    errors = _attempt(steps)
    if errors:
        raise CNIError(MASQ_FAILED, "masquerade teardown failed", "; ".join(errors))


def gc(network: str, valid: set[tuple[str, str]]) -> list[str]:
    """Remove this network's rules whose (container id, ifname) is not in `valid`.

    Keeps going past failures and returns them as messages.
    """
    validate_network_name(network)
    prefix = network_prefix(network)
    keep = {attachment_tag(network, cid, ifname) for cid, ifname in valid}

    def stale(comment: str) -> bool:
        return comment.startswith(prefix) and comment not in keep

    nft = _binary("nft")
    steps: list[Callable[[], object]] = [partial(_nft_replace, nft, stale)] if nft else []
    errors = []
    for ipt in _ipts():
        try:
            rules = _ipt_list(ipt, None)
        except CNIError as exc:
            errors.append(str(exc))
            continue
        steps += [
            partial(_ipt_remove, ipt, chain, rules)
            for chain, comment in _ipt_chains(rules).items()
            if stale(comment)
        ]
    return errors + _attempt(steps)


def attachment_has_rules(network: str, container_id: str, ifname: str) -> bool:
    """Whether either backend has masquerade rules in effect for this attachment."""
    validate_attachment(network, container_id, ifname)
    tag = attachment_tag(network, container_id, ifname)
    chain = _chain(network, container_id, ifname)
    nft = _binary("nft")
    if nft and any(comment == tag for _, comment in _nft_listing(nft)[0]):
        return True
    return any(
        _jump_target(rule) == chain for ipt in _ipts() for rule in _ipt_list(ipt, "POSTROUTING")
    )


def validate_attachment(network: str, container_id: str, ifname: str) -> None:
    validate_network_name(network)
    # NUL separates the fields in the hashed text, so it must not occur inside them.
    for name, value in (("CNI_CONTAINERID", container_id), ("CNI_IFNAME", ifname)):
        if not value or "\0" in value:
            raise CNIError(INVALID_ENV, f"invalid {name}", "empty or contains NUL")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def network_prefix(network: str) -> str:
    return f"pyb:{_hash(network)[:16]}:"


def attachment_tag(network: str, container_id: str, ifname: str) -> str:
    return network_prefix(network) + _hash(f"{container_id}\0{ifname}")[:16]


def _chain(network: str, container_id: str, ifname: str) -> str:
    digest = _hash(f"{network}\0{container_id}\0{ifname}")
    return _CHAIN_PREFIX + digest[: _CHAIN_LEN - len(_CHAIN_PREFIX)]


_binary = hostnet.find_binary


# The Debian package each binary comes from, for the error that says what to install.
_PACKAGE = {"nft": NFTABLES, "iptables": IPTABLES, "ip6tables": IPTABLES}


def _required(name: str) -> str:
    binary = _binary(name)
    if binary is None:
        raise CNIError(MASQ_FAILED, f"masquerade needs {name}",
                       f"not in PATH or sbin: install {_PACKAGE[name]}, or set ipMasq false")
    return binary


def _backend(backend: str | None) -> str:
    if backend is None:
        if _binary("nft"):
            return NFTABLES
        if not _binary("iptables") and not _binary("ip6tables"):
            raise CNIError(MASQ_FAILED, "masquerade needs nft or iptables",
                           "neither in PATH or sbin: install nftables, or set ipMasq false")
        return IPTABLES
    if backend not in (NFTABLES, IPTABLES):
        raise CNIError(INVALID_CONFIG, "invalid masquerade backend", f"{backend[:32]!r}")
    return backend


def _attempt(steps: Sequence[Callable[[], object]]) -> list[str]:
    """Run every step, collecting failures, so one broken backend does not strand the rest."""
    errors = []
    for step in steps:
        try:
            step()
        except CNIError as exc:
            errors.append(str(exc))
    return errors


def _run(argv: list[str], gone: tuple[str, ...] = ()) -> str:
    """An iptables command's output (nft runs through nft.py)."""
    try:
        with turns.waiting():
            proc = subprocess.run(
                argv, input="", capture_output=True, text=True, timeout=_TIMEOUT, check=False
            )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CNIError(MASQ_FAILED, f"{os.path.basename(argv[0])} failed", str(exc)) from exc
    if proc.returncode == 0:
        return proc.stdout
    if any(marker in proc.stderr for marker in gone):
        raise _Gone
    line = next((ln.strip() for ln in proc.stderr.splitlines() if ln.strip()), "no stderr")
    raise CNIError(
        MASQ_FAILED,
        f"{os.path.basename(argv[0])} failed",
        f"{shlex.join(argv[1:])}: exit {proc.returncode}: {line}",
    )


def _nft_failed(exc: nftables.NftError) -> CNIError:
    return CNIError(MASQ_FAILED, "nft failed", exc.details)


def _nft_listing(nft: str) -> tuple[list[tuple[int, str]], bool]:
    """(handle, comment) of each rule in our masq chain, and whether the base chain is intact
    (hooked at srcnat, holding exactly our _BASE_RULES rules by their comment, the masq chain
    there); none and False if the table does not exist."""
    try:
        items = nftables.listing(f"list table {_TABLE}", command=[nft])
    except nftables.NftError as exc:
        if exc.says(nftables.GONE):
            return [], False
        raise _nft_failed(exc) from exc
    try:
        chains = {c["name"]: c for c in (item["chain"] for item in items if "chain" in item)}
        rules = [item["rule"] for item in items if "rule" in item]
        masq = [(int(r["handle"]), str(r.get("comment", ""))) for r in rules if r["chain"] == "masq"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CNIError(MASQ_FAILED, "nft failed", f"unexpected JSON listing: {exc}") from exc
    base = chains.get("postrouting", {})
    intact = (
        "masq" in chains
        and (base.get("type"), base.get("hook"), base.get("prio")) == ("nat", "postrouting", 100)
        and [r.get("comment") for r in rules if r["chain"] == "postrouting"] == [_BASE_MARK] * _BASE_RULES
    )
    return masq, intact


def _nft_replace(nft: str, drop: Callable[[str], bool], add: str = "", base: bool = False) -> None:
    """Delete the masq rules whose comment `drop` selects and apply `add`, in one transaction;
    with `base`, (re)write the base chain too unless the listing found it intact."""

    def apply(gone: tuple[str, ...]) -> None:
        rules, intact = _nft_listing(nft)
        deletes = "".join(
            f"delete rule {_TABLE} masq handle {handle}\n" for handle, comment in rules if drop(comment)
        )
        script = deletes + (_NFT_BASE if base and not intact else "") + add
        if not script:
            return
        try:
            nftables.run(script, command=[nft])
        except nftables.NftError as exc:
            if exc.says(gone):
                raise _Gone from exc
            raise _nft_failed(exc) from exc

    try:
        apply(nftables.GONE)
    except _Gone:
        apply(())  # a concurrent DEL, GC or removal went first: list again, once


def _ipts() -> list[str]:
    return [b for b in map(_binary, _IPT_BINARY.values()) if b]


def _ipt(ipt: str, *args: str, gone: tuple[str, ...] = ()) -> None:
    _run([ipt, "-w", "5", "-t", "nat", *args], gone=gone)


def _ipt_list(ipt: str, chain: str | None) -> list[list[str]]:
    """`-S` output (one chain, or the whole nat table) split into argument lists."""
    out = _run([ipt, "-w", "5", "-t", "nat", "-S", *([chain] if chain else [])])
    rules = []
    for line in out.splitlines():
        try:
            rules.append(shlex.split(line))
        except ValueError:
            continue  # quoting shlex can't parse comes from other tools' comments, never ours
    return rules


def _ipt_chains(rules: list[list[str]]) -> dict[str, str]:
    """Our chains in a listing, each with the attachment tag its rules carry."""
    return {
        rule[1]: rule[rule.index("--comment") + 1]
        for rule in rules
        if rule[:1] == ["-A"]
        and rule[1].startswith(_CHAIN_PREFIX)
        and "--comment" in rule[:-1]
    }


def _jump_target(rule: list[str]) -> str | None:
    return rule[rule.index("-j") + 1] if "-j" in rule[:-1] else None


def _ipt_remove(ipt: str, chain: str, listing: list[list[str]]) -> None:
    """Delete the POSTROUTING jumps to `chain` found in `listing`, then the chain itself."""
    for rule in listing:
        if rule[:2] == ["-A", "POSTROUTING"] and _jump_target(rule) == chain:
            _ipt_if_present(ipt, "-D", *rule[1:])
    if _ipt_if_present(ipt, "-F", chain):
        _ipt_if_present(ipt, "-X", chain)


def _ipt_teardown(ipt: str, chain: str) -> None:
    # Flushing first tells whether the chain exists: with none there is no jump to it either
    # (iptables refuses a jump to a missing chain), and one exec is all a backend not in use costs.
    if _ipt_if_present(ipt, "-F", chain):
        _ipt_remove(ipt, chain, _ipt_list(ipt, "POSTROUTING"))


def _ipt_if_present(ipt: str, *args: str) -> bool:
    """Run a delete/flush; False if its target is already gone (never made, or a concurrent DEL)."""
    try:
        _ipt(ipt, *args, gone=_IPT_GONE)
    except _Gone:
        return False
    return True


def _ipt_setup(ipt: str, family: int, chain: str, tag: str, addrs: list[IPInterface]) -> None:
    _ipt_teardown(ipt, chain)
    if not addrs:
        return
    comment = ("-m", "comment", "--comment", tag)
    _ipt(ipt, "-N", chain)
    # -s per address keeps each address's exemption to its own subnet, as the nft rules do.
    for a in addrs:
        _ipt(ipt, "-A", chain, "-s", str(a.ip), "-d", str(a.network), *comment, "-j", "ACCEPT")
    _ipt(ipt, "-A", chain, "!", "-d", hostnet.MULTICAST[family], *comment, "-j", "MASQUERADE")
    for a in addrs:
        _ipt(ipt, "-A", "POSTROUTING", "-s", str(a.ip), *comment, "-j", chain)
