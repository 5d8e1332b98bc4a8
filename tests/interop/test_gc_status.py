"""GC and STATUS (spec 1.1.0), which libcni 1.1.2 lacks: hand-built calls as libcni >= 1.2 makes
them, with only CNI_COMMAND and CNI_PATH set and the attachments list in the config."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.harness import Host, delete_netns

from .drive import has_nat_rules, raw_call

pytestmark = pytest.mark.interop

NET, OTHER = "gcnet", "othernet"
NEW_KEY, OLD_KEY = "cni.dev/valid-attachments", "cni.dev/attachments"


def _conf(host: Host, name: str, subnet: str, backend: str, **ipam: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.1.0", "name": name, "type": "pybridge", "bridge": f"br-{name}",
        "isGateway": True, "ipMasq": True, "ipMasqBackend": backend,
        "ipam": {"type": "pyipam", "dataDir": str(host.data_dir), "ranges": [[{"subnet": subnet, **ipam}]]},
    }


def _attachments(*cids: str) -> list[dict[str, str]]:
    return [{"containerID": cid, "ifname": "eth0"} for cid in cids]


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_gc_releases_stale_reservations_and_rules_and_keeps_valid_ones(host: Host, backend: str) -> None:
    conf = _conf(host, NET, "10.69.0.0/24", backend)
    other = _conf(host, OTHER, "10.70.0.0/24", backend)
    pods = {cid: host.new_pod() for cid in ("gc-a", "gc-b", "gc-c")}
    results = {cid: host.add(conf, pod, cid) for cid, pod in pods.items()}
    host.add(other, host.new_pod(), "other-x")
    assert all(has_nat_rules(host, NET, cid) for cid in pods)
    # The runtime lost gc-c (its netns is gone without a DEL): only GC can free what it held.
    host.pods.remove(pods["gc-c"])
    delete_netns(pods["gc-c"])

    bad = raw_call(host, "GC", {**conf, NEW_KEY: [{"containerID": 1}]})
    assert bad.rc != 0 and bad.out["code"] == 7, bad.stdout
    assert len(host.reservations(NET)) == 3

    # libcni >= 1.2 sends both keys with the same list.
    valid = _attachments("gc-a", "gc-b")
    reply = raw_call(host, "GC", {**conf, NEW_KEY: valid, OLD_KEY: valid})
    assert reply.ok and reply.out is None, reply.stdout
    assert sorted(host.reservations(NET).values()) == ["gc-a\r\neth0", "gc-b\r\neth0"]
    assert not has_nat_rules(host, NET, "gc-c")
    assert has_nat_rules(host, NET, "gc-a") and has_nat_rules(host, NET, "gc-b")

    # The spec-v1.1.0 tag's key alone (older runtimes).
    reply = raw_call(host, "GC", {**conf, OLD_KEY: _attachments("gc-a")})
    assert reply.ok, reply.stdout
    assert list(host.reservations(NET).values()) == ["gc-a\r\neth0"]
    assert not has_nat_rules(host, NET, "gc-b")

    # GC is per network, and the valid attachment still works.
    assert list(host.reservations(OTHER).values()) == ["other-x\r\neth0"]
    assert has_nat_rules(host, OTHER, "other-x")
    check = host.cni("CHECK", {**conf, "prevResult": results["gc-a"]}, pods["gc-a"], "gc-a")
    assert check.ok, check.stdout
    assert host.ping(pods["gc-a"], "10.69.0.1")


def test_a_full_range_fails_the_add_not_status_until_gc_frees_it(host: Host) -> None:
    """STATUS says whether this node's network works: containerd 2.x turns any STATUS error into
    NetworkReady=false (node NotReady, pods evicted), so a full range fails only the next ADD."""
    conf = _conf(host, NET, "10.71.0.0/24", "nftables", rangeStart="10.71.0.10", rangeEnd="10.71.0.10")
    status = raw_call(host, "STATUS", conf)
    assert status.ok and status.out is None, status.stdout
    host.add(conf, host.new_pod(), "only")
    full = raw_call(host, "STATUS", conf)
    assert full.ok and full.out is None, full.stdout
    refused = host.cni("ADD", conf, host.new_pod(), "one-more")
    assert refused.rc != 0 and refused.out["code"] == 110, refused.stdout
    assert "(10.71.0.0/24: 1 of 1 in use)" in refused.out["msg"], refused.stdout
    assert raw_call(host, "GC", {**conf, NEW_KEY: [], OLD_KEY: []}).ok
    assert host.reservations(NET) == {}
    assert not has_nat_rules(host, NET, "only")
    assert host.cni("ADD", conf, host.new_pod(), "after-gc").ok


def test_status_and_gc_need_spec_110(host: Host) -> None:
    conf = {**_conf(host, NET, "10.72.0.0/24", "nftables"), "cniVersion": "1.0.0"}
    for verb in ("STATUS", "GC"):
        reply = raw_call(host, verb, conf)
        assert reply.rc != 0 and reply.out["code"] == 1, (verb, reply.stdout)


def test_pyipam_alone_gcs_what_the_reference_bridge_reserved(host: Host) -> None:
    """The reference bridge (spec <= 1.0.0) cannot GC; pyipam exec'd as a 1.1.0 IPAM plugin can."""
    conf = {**_conf(host, NET, "10.73.0.0/24", "nftables"), "type": "bridge", "ipMasq": False,
            "cniVersion": "1.0.0"}
    for cid in ("ref-1", "ref-2"):
        assert host.cni("ADD", conf, host.new_pod(), cid, plugin="bridge").ok
    assert raw_call(host, "GC", {**conf, "cniVersion": "1.1.0", NEW_KEY: _attachments("ref-2")},
                    plugin="pyipam").ok
    assert list(host.reservations(NET).values()) == ["ref-2\r\neth0"]
