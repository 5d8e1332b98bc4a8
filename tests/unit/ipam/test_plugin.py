"""ipam.plugin: the IPAM operations end to end on a temporary data directory."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from cnikit.spec.errors import EXHAUSTED, INVALID_CONFIG, INVALID_ENV, NOT_AVAILABLE, CNIError
from ipam.plugin import (
    NOT_FOUND,
    ipam_add,
    ipam_check,
    ipam_del,
    ipam_gc,
    ipam_status,
    list_reservations,
)


def netconf(data_dir: Path, name: str = "net1", **ipam: Any) -> dict[str, Any]:
    block = {"type": "pyipam", "dataDir": str(data_dir), "ranges": [[{"subnet": "10.1.0.0/24"}]]}
    return {"cniVersion": "1.1.0", "name": name, "type": "pybridge", "ipam": {**block, **ipam}}


def files(data_dir: Path, name: str = "net1") -> list[str]:
    return sorted(p.name for p in (data_dir / name).iterdir())


def test_add_result_dual_stack_with_routes_and_dns(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 10.0.0.53\nnameserver fd00::53\n; other\n"
                      "domain example.org\nsearch a.example b.example\noptions ndots:2 edns0\nbogus\n")
    conf = netconf(tmp_path / "data",
                   ranges=[[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]],
                   routes=[{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
                   resolvConf=str(resolv))
    assert ipam_add(conf, "c1", "eth0", {}) == {
        "cniVersion": "1.1.0",
        "ips": [{"address": "10.1.0.2/24", "gateway": "10.1.0.1"},
                {"address": "fd00::2/64", "gateway": "fd00::1"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
        "dns": {"nameservers": ["10.0.0.53", "fd00::53"], "domain": "example.org",
                "search": ["a.example", "b.example"], "options": ["ndots:2", "edns0"]},
    }


def test_add_minimal_result_has_no_routes_or_dns(tmp_path: Path) -> None:
    assert ipam_add(netconf(tmp_path), "c1", "eth0", {"IP": "10.1.0.9"}) == {
        "cniVersion": "1.1.0", "ips": [{"address": "10.1.0.9/24", "gateway": "10.1.0.1"}]}


def test_missing_resolv_conf_fails_before_reserving(tmp_path: Path) -> None:
    with pytest.raises(CNIError, match=r"ipam\.resolvConf") as exc_info:
        ipam_add(netconf(tmp_path, resolvConf=str(tmp_path / "nope")), "c1", "eth0", {})
    assert exc_info.value.code == INVALID_CONFIG
    assert not (tmp_path / "net1").exists()


def test_exhausted_range_set(tmp_path: Path) -> None:
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/29", "rangeStart": "10.1.0.2",
                                       "rangeEnd": "10.1.0.3"}]])
    ipam_add(conf, "c1", "eth0", {})
    ipam_add(conf, "c2", "eth0", {})
    with pytest.raises(CNIError) as exc_info:
        ipam_add(conf, "c3", "eth0", {})
    assert exc_info.value.code == EXHAUSTED
    assert exc_info.value.msg == ("no IP addresses available in range set: 10.1.0.2-10.1.0.3 "
                                  "(10.1.0.0/29: 2 of 2 in use)")


@pytest.mark.parametrize(("last", "expected"),
                         [("10.1.0.5", "10.1.0.6/24"), ("10.9.9.9", "10.1.0.2/24"), ("junk", "10.1.0.2/24")])
def test_add_starts_after_a_usable_last_reserved_ip(tmp_path: Path, last: str, expected: str) -> None:
    (tmp_path / "net1").mkdir()
    (tmp_path / "net1" / "last_reserved_ip.0").write_text(last)
    assert ipam_add(netconf(tmp_path), "c1", "eth0", {})["ips"][0]["address"] == expected


def test_del_releases_and_is_idempotent(tmp_path: Path) -> None:
    conf = netconf(tmp_path)
    ipam_add(conf, "c1", "eth0", {})
    ipam_add(conf, "c1", "eth1", {})
    assert ipam_del(conf, "c1", "eth0") == ["10.1.0.2"]
    assert ipam_del(conf, "c1", "eth0") == []
    assert ipam_del(conf, "unknown", "eth0") == []
    assert files(tmp_path) == ["10.1.0.3", "last_reserved_ip.0", "lock"]


def test_del_without_store_creates_nothing(tmp_path: Path) -> None:
    assert ipam_del(netconf(tmp_path / "data"), "c1", "eth0") == []
    assert not (tmp_path / "data").exists()


def test_check(tmp_path: Path) -> None:
    conf = netconf(tmp_path)
    with pytest.raises(CNIError) as exc_info:
        ipam_check(conf, "c1", "eth0")
    assert exc_info.value.code == NOT_FOUND
    ipam_add(conf, "c1", "eth0", {})
    ipam_check(conf, "c1", "eth0")
    with pytest.raises(CNIError, match="c1"):
        ipam_check(conf, "c1", "eth1")
    (tmp_path / "net1" / "10.1.0.50").write_text("legacy")
    ipam_check(conf, "legacy", "eth0")


def test_status_succeeds_on_a_full_pool_and_the_add_says_why(tmp_path: Path) -> None:
    """A full pool is this pod's problem, not the node's: containerd 2.x would turn a STATUS
    error into NetworkReady=false and kubelet would evict every pod of the node."""
    conf = netconf(tmp_path, ranges=[[{"subnet": "10.1.0.0/30"}]])  # one address: .2
    ipam_status(conf)
    assert files(tmp_path) == ["lock"]  # the write probe is gone
    ipam_add(conf, "c1", "eth0", {})
    ipam_status(conf)
    with pytest.raises(CNIError) as exc_info:
        ipam_add(conf, "c2", "eth0", {})
    assert exc_info.value.code == EXHAUSTED
    assert exc_info.value.msg.endswith("(10.1.0.0/30: 1 of 1 in use)")


def test_status_unusable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CNIError) as exc_info:
        ipam_status(netconf(tmp_path / "file" / "data"))
    assert exc_info.value.code == NOT_AVAILABLE


def test_gc_releases_what_is_not_valid(tmp_path: Path) -> None:
    conf = netconf(tmp_path)
    for cid, ifname in [("c1", "eth0"), ("c2", "eth0"), ("c2", "eth1")]:
        ipam_add(conf, cid, ifname, {})
    net = tmp_path / "net1"
    (net / "10.1.0.20").write_text("c3")  # legacy, c3 still has a valid attachment
    (net / "10.1.0.21").write_text("c4")  # legacy, c4 has none
    (net / "junk").write_text("keep me")
    released = ipam_gc(conf, {("c1", "eth0"), ("c3", "eth9")})
    assert sorted(released) == ["10.1.0.21", "10.1.0.3", "10.1.0.4"]
    assert files(tmp_path) == ["10.1.0.2", "10.1.0.20", "junk", "last_reserved_ip.0", "lock"]
    assert sorted(ipam_gc(conf, set())) == ["10.1.0.2", "10.1.0.20"]
    assert files(tmp_path) == ["junk", "last_reserved_ip.0", "lock"]


def test_gc_tells_the_callers_observer_what_it_released(tmp_path: Path) -> None:
    """The agent's metrics learn of GC releases through the call (Request.ipam_gc_released),
    not through a module-wide list: a call without one tells no one."""
    import io
    import json

    from cnikit import skel
    from ipam.verbs import VERBS

    conf = netconf(tmp_path)
    for cid in ("c1", "c2", "c3"):
        ipam_add(conf, cid, "eth0", {})
    told: list[tuple[str, int]] = []
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/nonexistent"}
    valid = {**conf, "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}
    out = io.StringIO()
    assert skel.run(lambda: VERBS, env, io.BytesIO(json.dumps(valid).encode()), out, program="pyipam",
                    stderr=io.StringIO(), ipam_gc_released=lambda net, n: told.append((net, n))) == 0, out
    assert told == [("net1", 2)]
    assert skel.run(lambda: VERBS, env, io.BytesIO(json.dumps(conf).encode()), out, program="pyipam",
                    stderr=io.StringIO()) == 0
    assert told == [("net1", 2)] and files(tmp_path) == ["last_reserved_ip.0", "lock"]


def test_list_reservations(tmp_path: Path) -> None:
    ipam_add(netconf(tmp_path, "b-net"), "c1", "eth0", {})
    ipam_add(netconf(tmp_path, "a-net", ranges=[[{"subnet": "fd00::/120"}]]), "c2", "net1", {})
    (tmp_path / "a-net" / "fd00::10").write_text("old")
    (tmp_path / "not a network").mkdir()
    assert list_reservations(str(tmp_path)) == [
        ("a-net", "fd00::2", "c2", "net1"), ("a-net", "fd00::10", "old", ""),
        ("b-net", "10.1.0.2", "c1", "eth0")]
    assert list_reservations(str(tmp_path), "b-net") == [("b-net", "10.1.0.2", "c1", "eth0")]
    assert list_reservations(str(tmp_path), "missing") == []
    assert list_reservations(str(tmp_path / "nowhere")) == []
    with pytest.raises(CNIError):
        list_reservations(str(tmp_path), "../etc")


@pytest.mark.parametrize(
    ("name", "container_id", "ifname", "code"),
    [
        ("../escape", "c1", "eth0", INVALID_CONFIG),
        ("net1", "../../escape", "eth0", INVALID_ENV),
        ("net1", "a/b", "eth0", INVALID_ENV),
        ("net1", "c1", "../x", INVALID_ENV),
        ("net1", "c1", "..", INVALID_ENV),
    ],
)
def test_path_escaping_names_rejected_before_any_file(
    tmp_path: Path, name: str, container_id: str, ifname: str, code: int
) -> None:
    data = tmp_path / "data"
    conf = netconf(data, name)
    for op in (lambda: ipam_add(conf, container_id, ifname, {}),
               lambda: ipam_del(conf, container_id, ifname),
               lambda: ipam_check(conf, container_id, ifname)):
        with pytest.raises(CNIError) as exc_info:
            op()
        assert exc_info.value.code == code
    assert list(tmp_path.iterdir()) == []


def _add_one(args: tuple[str, str]) -> str:
    data_dir, container_id = args
    conf = netconf(Path(data_dir), ranges=[[{"subnet": "10.1.0.0/28"}]])
    return str(ipam_add(conf, container_id, "eth0", {})["ips"][0]["address"])


def test_concurrent_adds_from_processes_get_distinct_ips(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(8) as pool:
        got = pool.map(_add_one, [(str(tmp_path), f"c{n}") for n in range(13)])
    assert len(set(got)) == 13  # the whole /28 pool: .2-.14
    assert sorted(got) == sorted(f"10.1.0.{n}/28" for n in range(2, 15))
    with pytest.raises(CNIError) as exc_info:
        _add_one((str(tmp_path), "c99"))
    assert exc_info.value.code == EXHAUSTED
