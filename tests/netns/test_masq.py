"""masq.py against real nftables/iptables, each test inside its own throw-away network namespace.

The test thread enters a namespace with setns(2) (subprocesses inherit it) and always returns to
where it came from; nothing here runs nft, iptables or ip against the machine's own namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface, IPv6Interface, ip_interface
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import masq
from cnikit.spec.errors import CNIError
from testbed.harness import RUN_MARK, TEST_PREFIX

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

NET = "pbt-net"
V4 = IPv4Interface("10.77.0.2/24")
V6 = IPv6Interface("fd77::2/64")
REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block with this thread in netns `name`, then return to the previous one."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
        _setns(target.fileno())
        try:
            # Go no further unless the switch really happened.
            assert os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(target.fileno()).st_ino
            yield
        finally:
            _setns(home.fileno())


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Creates named throw-away namespaces; all of them are deleted at teardown, also on failure."""
    made: list[str] = []

    def make() -> str:
        name = f"{TEST_PREFIX}{RUN_MARK}-masq-{secrets.token_hex(4)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def host(make_netns: Callable[[], str]) -> Iterator[str]:
    """The test body runs inside this namespace, standing in for the plugin's host netns."""
    name = make_netns()
    with inside(name):
        yield name


@pytest.fixture(params=[masq.NFTABLES, masq.IPTABLES])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tag(network: str, container_id: str, ifname: str) -> str:
    def h(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return f"pyb:{h(network)}:{h(container_id + chr(0) + ifname)}"


def nft_rules(chain: str) -> list[dict[str, Any]]:
    items = json.loads(sh("nft", "-j", "list", "ruleset"))["nftables"]
    return [
        i["rule"] for i in items
        if "rule" in i and i["rule"]["table"] == "pybridge" and i["rule"]["chain"] == chain
    ]


def masq_rule(rule: dict[str, Any]) -> tuple[str, str, str, str]:
    """(comment, pod address, excluded subnet, action) of one rule in chain masq."""
    saddr, daddr, action = rule["expr"]
    assert saddr["match"]["op"] == "==" and daddr["match"]["op"] == "!="
    prefix = daddr["match"]["right"]["prefix"]
    [verb] = action
    return rule["comment"], saddr["match"]["right"], f"{prefix['addr']}/{prefix['len']}", verb


def ipt_rules(binary: str = "iptables") -> list[list[str]]:
    return [shlex.split(line) for line in sh(binary, "-t", "nat", "-S").splitlines()]


def our_ipt_chains() -> list[str]:
    return [r[1] for b in ("iptables", "ip6tables") for r in ipt_rules(b) if r[:1] == ["-N"]]


def test_nftables_layout(host: str) -> None:
    masq.setup(NET, "c1", "eth0", [V4], masq.NFTABLES)

    [base] = [
        i["chain"] for i in json.loads(sh("nft", "-j", "list", "ruleset"))["nftables"]
        if i.get("chain", {}).get("name") == "postrouting" and i["chain"]["table"] == "pybridge"
    ]
    assert (base["family"], base["type"], base["hook"], base["prio"]) == (
        "inet", "nat", "postrouting", 100,  # 100 is srcnat
    )
    returns = [r["expr"] for r in nft_rules("postrouting")]
    assert [e[-1] for e in returns] == [
        {"return": None}, {"return": None}, {"jump": {"target": "masq"}},
    ]
    assert [e[0]["match"]["right"]["prefix"] for e in returns[:2]] == [
        {"addr": "224.0.0.0", "len": 4}, {"addr": "ff00::", "len": 8},
    ]
    assert [masq_rule(r) for r in nft_rules("masq")] == [
        (tag(NET, "c1", "eth0"), "10.77.0.2", "10.77.0.0/24", "masquerade"),
    ]
    assert our_ipt_chains() == []
    assert masq.attachment_has_rules(NET, "c1", "eth0")


def test_an_intact_base_chain_is_left_alone_and_a_broken_one_rewritten(host: str) -> None:
    """Rewriting the base chain costs a transaction that waits for the kernel: a setup writes it
    only when the listing does not find it whole, as this or an older version left it."""
    masq.setup(NET, "c1", "eth0", [V4], masq.NFTABLES)
    handles = [r["handle"] for r in nft_rules("postrouting")]
    masq.setup(NET, "c2", "eth0", [IPv4Interface("10.77.0.3/24")], masq.NFTABLES)
    assert [r["handle"] for r in nft_rules("postrouting")] == handles  # not flushed and re-added
    # A base without the jump, then one as versions before the marks wrote it (no comments).
    sh("nft", "delete", "rule", "inet", "pybridge", "postrouting", "handle", str(handles[-1]))
    unmarked = "\n".join(line.split(" comment ")[0] for line in masq._NFT_BASE.splitlines())
    for i, damage in enumerate((None, unmarked)):
        if damage:
            subprocess.run(["nft", "-f", "-"], input=damage, text=True, check=True)
        masq.setup(NET, f"c{i + 3}", "eth0", [IPv4Interface(f"10.77.0.{i + 4}/24")], masq.NFTABLES)
        returns = [r["expr"] for r in nft_rules("postrouting")]
        assert [e[-1] for e in returns] == [{"return": None}, {"return": None}, {"jump": {"target": "masq"}}]
        assert [r.get("comment") for r in nft_rules("postrouting")] == [masq._BASE_MARK] * 3
    assert len(nft_rules("masq")) == 4


def test_iptables_layout(host: str) -> None:
    masq.setup(NET, "c1", "eth0", [V4, V6], masq.IPTABLES)

    comment = ["-m", "comment", "--comment", tag(NET, "c1", "eth0")]
    [chain] = [r[1] for r in ipt_rules() if r[:1] == ["-N"]]
    assert len(chain) == 28 and chain.startswith("PYB-")
    assert [r for r in ipt_rules() if r[0] == "-A"] == [
        ["-A", "POSTROUTING", "-s", "10.77.0.2/32", *comment, "-j", chain],
        ["-A", chain, "-s", "10.77.0.2/32", "-d", "10.77.0.0/24", *comment, "-j", "ACCEPT"],
        ["-A", chain, "!", "-d", "224.0.0.0/4", *comment, "-j", "MASQUERADE"],
    ]
    assert [r for r in ipt_rules("ip6tables") if r[0] == "-A"] == [
        ["-A", "POSTROUTING", "-s", "fd77::2/128", *comment, "-j", chain],
        ["-A", chain, "-s", "fd77::2/128", "-d", "fd77::/64", *comment, "-j", "ACCEPT"],
        ["-A", chain, "!", "-d", "ff00::/8", *comment, "-j", "MASQUERADE"],
    ]
    assert nft_rules("masq") == []
    assert masq.attachment_has_rules(NET, "c1", "eth0")


def test_dual_stack_nftables(host: str) -> None:
    masq.setup(NET, "c1", "eth0", [V4, V6], masq.NFTABLES)

    t = tag(NET, "c1", "eth0")
    assert sorted(masq_rule(r) for r in nft_rules("masq")) == [
        (t, "10.77.0.2", "10.77.0.0/24", "masquerade"),
        (t, "fd77::2", "fd77::/64", "masquerade"),
    ]
    protocols = [r["expr"][0]["match"]["left"]["payload"]["protocol"] for r in nft_rules("masq")]
    assert sorted(protocols) == ["ip", "ip6"]


def test_teardown_keeps_other_attachments(host: str, backend: str) -> None:
    attachments = [("c1", "eth0", "10.77.0.2/24"), ("c2", "eth0", "10.77.0.3/24"),
                   ("c1", "net1", "fd77::4/64")]
    for cid, ifname, addr in attachments:
        masq.setup(NET, cid, ifname, [ip_interface(addr)], backend)

    masq.teardown(NET, "c1", "eth0")
    masq.teardown(NET, "c1", "eth0")  # DEL must be idempotent

    assert not masq.attachment_has_rules(NET, "c1", "eth0")
    assert masq.attachment_has_rules(NET, "c2", "eth0")
    assert masq.attachment_has_rules(NET, "c1", "net1")
    if backend == masq.NFTABLES:
        assert {masq_rule(r)[1] for r in nft_rules("masq")} == {"10.77.0.3", "fd77::4"}
    else:
        assert len(our_ipt_chains()) == 2
    for cid, ifname, _ in attachments[1:]:
        masq.teardown(NET, cid, ifname)
    assert nft_rules("masq") == [] and our_ipt_chains() == []


def test_teardown_with_nothing_set_up(host: str) -> None:
    masq.teardown(NET, "never", "eth0")
    assert not masq.attachment_has_rules(NET, "never", "eth0")


def test_setup_twice_replaces(host: str, backend: str) -> None:
    masq.setup(NET, "c1", "eth0", [V4, V6], backend)
    masq.setup(NET, "c1", "eth0", [IPv4Interface("10.77.0.9/24")], backend)

    if backend == masq.NFTABLES:
        assert [masq_rule(r)[1] for r in nft_rules("masq")] == ["10.77.0.9"]
        assert len(nft_rules("postrouting")) == 3
    else:
        jumps = [r for r in ipt_rules() if r[:2] == ["-A", "POSTROUTING"]]
        assert [r[3] for r in jumps] == ["10.77.0.9/32"]
        assert [r for r in ipt_rules("ip6tables") if r[0] in ("-N", "-A")] == []


def test_gc_removes_only_invalid(host: str, backend: str) -> None:
    for cid in ("keep", "drop1", "drop2"):
        masq.setup(NET, cid, "eth0", [V4, V6], backend)
    masq.setup("other-net", "drop1", "eth0", [V4], backend)

    assert masq.gc(NET, {("keep", "eth0"), ("absent", "eth0")}) == []

    assert masq.attachment_has_rules(NET, "keep", "eth0")
    assert not masq.attachment_has_rules(NET, "drop1", "eth0")
    assert not masq.attachment_has_rules(NET, "drop2", "eth0")
    assert masq.attachment_has_rules("other-net", "drop1", "eth0")
    assert masq.gc(NET, {("keep", "eth0")}) == []  # nothing left to do is success


def test_gc_keeps_going_past_errors(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    masq.setup(NET, "drop", "eth0", [V4], masq.NFTABLES)
    real = masq._binary
    monkeypatch.setattr(masq, "_binary", lambda n: "/bin/false" if n == "iptables" else real(n))

    errors = masq.gc(NET, set())

    assert len(errors) == 1 and "false failed" in errors[0]
    monkeypatch.undo()
    assert not masq.attachment_has_rules(NET, "drop", "eth0")


def test_auto_backend_picks_nftables(host: str) -> None:
    masq.setup(NET, "c1", "eth0", [V4])
    assert len(nft_rules("masq")) == 1 and our_ipt_chains() == []


def test_auto_backend_without_nft(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = masq._binary
    monkeypatch.setattr(masq, "_binary", lambda n: None if n == "nft" else real(n))

    masq.setup(NET, "c1", "eth0", [V4])
    assert len(our_ipt_chains()) == 1
    with pytest.raises(CNIError, match="needs nft"):
        masq.setup(NET, "c2", "eth0", [V4], masq.NFTABLES)
    masq.teardown(NET, "c1", "eth0")
    assert our_ipt_chains() == []


def test_no_binaries_teardown_and_gc_succeed(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masq, "_binary", lambda n: None)
    masq.teardown(NET, "c1", "eth0")
    assert masq.gc(NET, set()) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda: masq.setup(NET, "c1", "eth0", [IPv6Interface("fe80::1%x;flush ruleset/64")]),
        lambda: masq.setup(NET, "c1", "eth0", ["10.0.0.1/24"]),  # type: ignore[list-item]
        lambda: masq.setup(NET, "c1", "eth0", [V4], "ebtables"),
        lambda: masq.setup("bad name", "c1", "eth0", [V4]),
        lambda: masq.teardown(NET, "c1\0x", "eth0"),
        lambda: masq.teardown(NET, "c1", ""),
    ],
)
def test_rejects_bad_input_before_touching_rules(host: str, call: Callable[[], None]) -> None:
    with pytest.raises(CNIError) as err:
        call()
    assert err.value.code < 100
    assert nft_rules("masq") == [] and our_ipt_chains() == []


def test_binary_failure_is_a_cni_error(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # An IPv6 masquerade rule in an ip-family table is refused by nft: a real failure.
    monkeypatch.setattr(masq, "_TABLE", "ip pybridge")
    with pytest.raises(CNIError) as err:
        masq.setup(NET, "c1", "eth0", [V6], masq.NFTABLES)
    assert err.value.code == masq.MASQ_FAILED
    assert str(err.value).startswith("nft failed: /dev/stdin:8:")  # nft's error line, where it points
    assert "Error: conflicting protocols specified: ip vs. ip6" in str(err.value)


def test_concurrent_first_setups_converge(host: str) -> None:
    """Parallel first ADDs, then DELs, in separate processes: no errors, one base chain."""
    code = (
        "import sys, ipaddress; from cni_plugin import masq; c, verb, addr = sys.argv[1:]; "
        "masq.setup('n', c, 'eth0', [ipaddress.ip_interface(addr)]) "
        "if verb == 'setup' else masq.teardown('n', c, 'eth0')"
    )
    for verb, expected in (("setup", 8), ("teardown", 0)):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, f"c{i}", verb, f"10.77.0.{i + 10}/24"],
                cwd=REPO, stderr=subprocess.PIPE, text=True,
            )
            for i in range(8)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        assert len(nft_rules("masq")) == expected
        assert len(nft_rules("postrouting")) == 3


def _link(make_netns: Callable[[], str], host: str, host_if: str, host_addr: str,
          peer_addr: str) -> str:
    """A new namespace joined to `host` by a veth; its end is eth0 with `peer_addr`."""
    peer = make_netns()
    sh("ip", "-n", host, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
       "netns", peer)
    for ns, ifname, addr in ((host, host_if, host_addr), (peer, "eth0", peer_addr)):
        # No DAD, so IPv6 addresses (link-local included) are usable at once.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0")
        sh("ip", "-n", ns, "addr", "add", addr, "dev", ifname, "nodad")
        sh("ip", "-n", ns, "link", "set", ifname, "up")
    return peer


def _connect(pod: str, outside: str, server: str, timeout: float) -> str | None:
    """Source address the outside listener sees for a TCP connection from the pod, or None."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with inside(outside):
        listener = socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.bind((server, 0))
        listener.listen(1)
        listener.settimeout(timeout)
        with inside(pod):
            client = socket.socket(family, socket.SOCK_STREAM)
        with client:
            client.settimeout(timeout)
            try:
                client.connect((server, listener.getsockname()[1]))
            except OSError:
                return None
            conn, peer = listener.accept()
            conn.close()
            return str(peer[0])


@pytest.mark.parametrize(
    ("pod_addr", "gw", "host_out", "server", "prefix"),
    [
        ("10.88.0.2/24", "10.88.0.1", "198.51.100.1", "198.51.100.2", 24),
        ("fd88::2/64", "fd88::1", "2001:db8:1::1", "2001:db8:1::2", 64),
    ],
)
def test_traffic_is_masqueraded(make_netns: Callable[[], str], backend: str, pod_addr: str,
                                gw: str, host_out: str, server: str, prefix: int) -> None:
    """pod --veth-- host (masq) --veth-- outside; outside has no route back to the pod subnet."""
    host = make_netns()
    pod = _link(make_netns, host, "vpod", f"{gw}/{prefix}", pod_addr)
    outside = _link(make_netns, host, "vout", f"{host_out}/{prefix}", f"{server}/{prefix}")
    sh("ip", "-n", pod, "route", "add", "default", "via", gw)
    sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1",
       "net.ipv6.conf.all.forwarding=1")

    with inside(host):
        masq.setup(NET, "c1", "eth0", [ip_interface(pod_addr)], backend)
    assert _connect(pod, outside, server, timeout=5) == host_out

    with inside(host):
        masq.teardown(NET, "c1", "eth0")
    # Unmasqueraded, the reply has no way back to the pod.
    assert _connect(pod, outside, server, timeout=1) is None

