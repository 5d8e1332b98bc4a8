"""Delegation both ways through libcni, on one host-local store shared by pyipam and host-local."""

from __future__ import annotations

import os
from typing import Any

import pytest

from testbed.harness import REFERENCE_PLUGINS, Host

from .drive import Libcni, conflist

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not os.path.exists(os.path.join(REFERENCE_PLUGINS, "host-local")),
                       reason="Debian containernetworking-plugins not installed"),
]

NET = "shared"
# Four addresses: the allocations below exhaust the range, so every IPAM must see every
# reservation, and last_reserved_ip written by one must steer the other's round robin.
RANGE = {"subnet": "10.68.0.0/24", "rangeStart": "10.68.0.2", "rangeEnd": "10.68.0.5"}
COMBOS = {  # file tag -> (main plugin, ipam)
    "ref-py": ("bridge", "pyipam"),    # the reference bridge execs pyipam from CNI_PATH
    "py-hl": ("pybridge", "host-local"),  # pybridge execs host-local
    "py-py": ("pybridge", "pyipam"),   # pybridge with pyipam in-process
    "ref-hl": ("bridge", "host-local"),
}


def _lists(host: Host, libcni: Libcni) -> dict[str, str]:
    paths = {}
    for tag, (plugin, ipam) in COMBOS.items():
        conf = conflist(host, NET, "1.0.0", type=plugin, bridge="br-shared", isDefaultGateway=False,
                        ipam={"type": ipam, "dataDir": str(host.data_dir), "ranges": [[RANGE]]})
        paths[tag] = libcni.write(conf, file=f"{tag}.conflist")
    return paths


def _ip(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"].split("/")[0])


def test_pyipam_and_host_local_share_one_store_in_both_directions(host: Host, libcni: Libcni) -> None:
    lists = _lists(host, libcni)
    pods = {tag: host.new_pod() for tag in COMBOS}
    got = {tag: _ip(libcni.ok("add", lists[tag], pods[tag], container_id=tag)) for tag in COMBOS}
    # Strict round robin across implementations: each continued from the other's last_reserved_ip.
    assert got == {"ref-py": "10.68.0.2", "py-hl": "10.68.0.3", "py-py": "10.68.0.4", "ref-hl": "10.68.0.5"}
    assert host.reservations(NET) == {ip: f"{tag}\r\neth0" for tag, ip in got.items()}
    last = (host.data_dir / NET / "last_reserved_ip.0").read_bytes()
    assert last == b"10.68.0.5"
    # Pods made by the reference bridge and by pybridge share the bridge and reach each other.
    assert host.ping(pods["ref-py"], got["py-py"])
    assert host.ping(pods["py-hl"], got["ref-hl"])
    # The range is full for both IPAMs: neither hands out an address the other reserved.
    for tag in ("py-py", "py-hl"):
        extra = host.new_pod()
        reply = libcni.run("add", lists[tag], extra, container_id=f"extra-{tag}")
        assert not reply.ok, reply.stdout
        assert b"no IP addresses available in range set: 10.68.0.2-10.68.0.5" in reply.stderr, reply.stderr
        assert len(host.reservations(NET)) == 4
        libcni.ok("del", lists[tag], extra, container_id=f"extra-{tag}")
    # Release across implementations: host-local frees pyipam's record, pyipam frees host-local's.
    libcni.ok("del", lists["ref-hl"], pods["ref-py"], container_id="ref-py")
    libcni.ok("del", lists["py-py"], pods["py-hl"], container_id="py-hl")
    assert sorted(host.reservations(NET)) == ["10.68.0.4", "10.68.0.5"]
    # Each takes the next free address after the last reserved one (.5 wraps to .2).
    again = host.new_pod()
    assert _ip(libcni.ok("add", lists["py-py"], again, container_id="again-py")) == "10.68.0.2"
    again_hl = host.new_pod()
    assert _ip(libcni.ok("add", lists["py-hl"], again_hl, container_id="again-hl")) == "10.68.0.3"
    for tag, pod, cid in (("py-py", pods["py-py"], "py-py"), ("ref-hl", pods["ref-hl"], "ref-hl"),
                          ("ref-py", again, "again-py"), ("py-hl", again_hl, "again-hl")):
        libcni.ok("del", lists[tag], pod, container_id=cid)
    assert host.reservations(NET) == {}
    assert libcni.cache_files() == []
