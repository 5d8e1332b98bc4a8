"""ADD's source-check setup as one nfnetlink batch (sourcecheck._create_port, nfexpr.py): the
chain it builds lists as the one nft builds from the rules' text, for every shape the rules take;
it runs no nft; and where it misses (no table yet, a retried ADD's chain) nft's listing path
still does the work. Each case has netns of its own, made here and removed after."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from ipaddress import ip_interface
from typing import Any

import pytest

from cni_plugin import sourcecheck
from cnikit.ip import IPInterface
from testbed.harness import delete_netns, new_netns, sh

from .netpol_probe import in_netns

pytestmark = pytest.mark.netns
MAC = "0a:58:0a:58:00:09"
CHAIN = sourcecheck.chain_name("net", "c", "eth0")


@pytest.fixture
def netns() -> Iterator[list[str]]:
    """Two fresh netns: the batch's and nft's."""
    made = [new_netns("scb"), new_netns("scb")]
    try:
        yield made
    finally:
        for name in made:
            delete_netns(name)


def _nft(ns: str, *args: str, input: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, "nft", *args,
              input=None if input is None else input.encode()).stdout.decode()


def _forbid_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("nft ran")
    monkeypatch.setattr(sourcecheck.nftables, "run", refuse)
    monkeypatch.setattr(sourcecheck, "_replace", refuse)


def _socket_fails(*_: object, **__: object) -> None:
    raise OSError("no socket")  # setup then runs nft, as before the batch


def _listed(ns: str) -> tuple[list[Any], dict[str, Any]]:
    """The chain's rules' expressions (no handles) and the `ports` map's elements, as nft lists
    them; an anonymous set's elements in order (the kernel's hash keeps none)."""
    items = json.loads(_nft(ns, "-j", "list", "chain", "bridge", "pybridge", CHAIN))["nftables"]
    rules = [item["rule"]["expr"] for item in items if "rule" in item]
    for rule in rules:
        for expr in rule:
            right = expr.get("match", {}).get("right")
            if isinstance(right, dict) and isinstance(right.get("set"), list):
                right["set"] = sorted(right["set"], key=json.dumps)
    ports = json.loads(_nft(ns, "-j", "list", "map", "bridge", "pybridge", "ports"))["nftables"]
    return rules, next(item["map"] for item in ports if "map" in item)["elem"]


def _expressions(ns: str) -> list[str]:
    """The chain's expressions as the kernel holds them (`nft --debug=netlink`: also what the
    JSON listing folds away, such as a dependency said twice), anonymous sets unnumbered."""
    listing = _nft(ns, "--debug=netlink", "list", "chain", "bridge", "pybridge", CHAIN)
    return [re.sub(r"__set\d+", "__set", line) for line in listing.splitlines() if line.startswith("  [")]


V4, V4B = ip_interface("10.88.0.9/24"), ip_interface("10.88.0.19/24")
V6, V6B = ip_interface("fd88::9/64"), ip_interface("fd88:1::19/64")
CASES: dict[str, tuple[list[IPInterface], bool]] = {
    "v4 only, ipv6 off": ([V4], False),
    "v4 only, ipv6 on (the link-local alone)": ([V4], True),
    "v6 only with the link-local": ([V6], True),
    "v6 only, ipv6 off (one address)": ([V6], False),
    "dual stack, several addresses": ([V4, V4B, V6, V6B], True),
    "dual stack, ipv6 off": ([V4B, V4, V6B], False),
    "no IPAM addresses": ([], True),
    "no IPAM addresses, ipv6 off": ([], False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_batch_builds_the_chain_nft_builds_from_the_text(
        netns: list[str], monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    addrs, ipv6 = CASES[case]
    built = {}
    for ns, batch in zip(netns, (True, False), strict=True):
        _nft(ns, "-f", "-", input=sourcecheck._BASE)  # the table there: the batch's fast path
        with monkeypatch.context() as patch:
            if batch:
                _forbid_nft(patch)
            else:
                patch.setattr(sourcecheck.nfbatch, "send", _socket_fails)
            in_netns(ns, lambda: sourcecheck.setup("net", "c", "eth0", "vethx", MAC, addrs, ipv6))
        built[batch] = (_listed(ns), _expressions(ns))
    (rules, elements), expressions = built[True]
    assert len(rules) == len(sourcecheck.port_rules(MAC, addrs, ipv6)) and expressions
    assert elements == [["vethx", {"goto": {"target": CHAIN}}]]
    assert built[True][0] == built[False][0]
    assert expressions == built[False][1]


def _set_up(ns: str, port: str) -> None:
    in_netns(ns, lambda: sourcecheck.setup("net", "c", "eth0", port, MAC, [V4, V6], True))


def test_without_the_table_the_listing_path_makes_it(
        netns: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    run = sourcecheck.nftables.run

    def spy(script: str, **kw: Any) -> str:
        ran.append(script)
        return run(script, **kw)
    monkeypatch.setattr(sourcecheck.nftables, "run", spy)
    _set_up(netns[0], "vethx")
    assert ran and "add table bridge pybridge" in ran[-1]  # the base, with the chain, by nft
    base = json.loads(_nft(netns[0], "-j", "list", "chain", "bridge", "pybridge", "prerouting"))["nftables"]
    assert [item["rule"]["comment"] for item in base if "rule" in item] == [sourcecheck._BASE_MARK]
    assert _listed(netns[0])[1] == [["vethx", {"goto": {"target": CHAIN}}]]


def test_a_retried_add_takes_over_the_chain_it_left(
        netns: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain is there (the first ADD died after its batch): the batch is refused whole
    (EEXIST) and the listing path rewrites the chain and moves the element to the new port."""
    _set_up(netns[0], "vethx")
    with monkeypatch.context() as patch:
        _forbid_nft(patch)
        with pytest.raises(AssertionError, match="nft ran"):
            _set_up(netns[0], "vethy")  # the batch missed: the fallback is what runs next
    _set_up(netns[0], "vethy")
    rules, elements = _listed(netns[0])
    assert elements == [["vethy", {"goto": {"target": CHAIN}}]]
    assert len(rules) == len(sourcecheck.port_rules(MAC, [V4, V6], True))  # not twice


def test_a_port_still_mapped_to_another_attachment_is_taken_over(netns: list[str]) -> None:
    """The port's element still names another attachment's chain (its DEL's teardown not yet
    run): the kernel refuses the batch (EEXIST on the element) and the listing path maps the
    port to the new chain."""
    _set_up(netns[0], "vethx")
    in_netns(netns[0], lambda: sourcecheck.setup("net", "d", "eth0", "vethx", MAC, [V4], False))
    ports = json.loads(_nft(netns[0], "-j", "list", "map", "bridge", "pybridge", "ports"))["nftables"]
    assert next(item["map"] for item in ports if "map" in item)["elem"] == [
        ["vethx", {"goto": {"target": sourcecheck.chain_name("net", "d", "eth0")}}]]
