"""The node controller's pure reconcile (cni_plugin/node/model.py) and the bundle installer."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from cni_plugin.files import write_bytes
from cni_plugin.node import model
from cni_plugin.node.bundle import install_bundle
from cnikit.programs import program_for

from ...fakeapi.apiserver import load

R = model.Route
ME = "pybridge-worker"
CLUSTER = (ipaddress.ip_network("10.70.0.0/16"), ipaddress.ip_network("fd00:10:70::/56"))


def nodes(name: str = "nodes.json") -> list[model.Node]:
    return [model.node_from_object(o) for o in load(name)["items"]]


def test_node_from_object_reads_podcidrs_and_internal_ips_only() -> None:
    obj = {
        "metadata": {"name": "n"},
        "spec": {"podCIDR": "10.1.0.0/24"},
        "status": {
            "addresses": [
                {"type": "Hostname", "address": "n"},
                {"type": "ExternalIP", "address": "1.2.3.4"},
                {"type": "InternalIP", "address": "172.18.0.9"},
                {"type": "InternalIP", "address": "bogus"},
            ]
        },
    }
    node = model.node_from_object(obj)
    assert node.pod_cidrs == (ipaddress.ip_network("10.1.0.0/24"),)  # legacy podCIDR alone still counts
    assert node.internal_ips == (ipaddress.ip_address("172.18.0.9"),)
    assert (
        model.node_from_object({"metadata": {"name": "x"}, "spec": {"podCIDRs": ["10.1.0.1/24"]}}).pod_cidrs
        == ()
    )


def test_routes_to_every_other_node_per_family() -> None:
    assert model.desired_routes(ME, nodes(), CLUSTER) == {
        R("10.70.0.0/24", "172.18.0.4"),
        R("10.70.2.0/24", "172.18.0.3"),
    }
    dual = model.desired_routes(ME, nodes("nodes-dualstack.json"), CLUSTER)
    assert R("fd00:10:70:2::/64", "fc00:f853:ccd:e793::3") in dual and len(dual) == 4


def test_no_route_without_an_address_of_that_family_or_for_a_clashing_cidr() -> None:
    me = model.Node(ME, (ipaddress.ip_address("172.18.0.2"),), (ipaddress.ip_network("10.70.1.0/24"),))
    v6only = model.Node("a", (ipaddress.ip_address("fc00::3"),), (ipaddress.ip_network("10.70.2.0/24"),))
    clash = model.Node("b", (ipaddress.ip_address("172.18.0.5"),), (ipaddress.ip_network("10.70.1.0/25"),))
    assert model.desired_routes(ME, [me, v6only, clash], CLUSTER) == frozenset()
    plan = model.desired(model.Settings(ME, cluster_cidrs=CLUSTER), [me, v6only, clash], (), 1500)
    assert plan.waiting is None


def test_route_changes_delete_departed_and_replace_moved() -> None:
    current = {R("10.70.2.0/24", "172.18.0.3"), R("10.70.3.0/24", "172.18.0.5")}
    desired = frozenset({R("10.70.2.0/24", "172.18.0.9"), R("10.70.4.0/24", "172.18.0.6")})
    deletes, sets = model.route_changes(current, desired)
    assert deletes == {R("10.70.3.0/24", "172.18.0.5")}  # node left
    assert sets == desired  # moved gateway: replaced in place, not deleted
    assert model.route_changes(desired, desired) == (frozenset(), frozenset())


def test_waits_until_own_node_and_podcidrs_exist() -> None:
    assert model.desired(model.Settings("absent"), nodes(), (), 1500).waiting == "node 'absent' not found"
    bare = [model.Node(ME, (ipaddress.ip_address("172.18.0.2"),), ())]
    plan = model.desired(model.Settings(ME, cluster_cidrs=CLUSTER), bare, (), 1500)
    assert (
        plan.waiting and "no podCIDRs" in plan.waiting and plan.conflist is None and plan.masquerade is None
    )


def test_conflist() -> None:
    settings = model.Settings(ME, ipam_data_dir="/x", cluster_cidrs=CLUSTER)
    plan = model.desired(settings, nodes("nodes-dualstack.json"), (), 1450)
    conf = plan.conflist
    assert conf is not None
    assert conf["cniVersion"] == "1.1.0" and conf["name"] == "pybridge"
    bridge, portmap = conf["plugins"]
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
    assert bridge["mtu"] == 1450 and bridge["ipMasq"] is False and bridge["hairpinMode"] is True
    assert bridge["isDefaultGateway"] is True
    assert bridge["ipam"] == {
        "type": "pyipam",
        "dataDir": "/x",
        "ranges": [[{"subnet": "10.70.1.0/24"}], [{"subnet": "fd00:10:70:1::/64"}]],
    }
    assert "mtu" not in model.conflist(settings, nodes()[1], None)["plugins"][0]
    # the conflist is loadable by the plugin's own config parser
    from cni_plugin import config

    config.load({"cniVersion": conf["cniVersion"], "name": conf["name"], **bridge})


def test_masquerade_script() -> None:
    script = model.masquerade_script(
        [ipaddress.ip_network("10.70.1.0/24"), ipaddress.ip_network("fd00:1::/64")],
        [ipaddress.ip_network("10.70.0.0/16")],
    )
    assert script.startswith("add table inet pybridge_node\ndelete table inet pybridge_node\n")
    assert "ip saddr { 10.70.1.0/24 } ip daddr != { 10.70.0.0/16, 224.0.0.0/4 } masquerade" in script
    assert "ip6 saddr { fd00:1::/64 } ip6 daddr != { ff00::/8 } masquerade" in script
    assert "ip6" not in model.masquerade_script([ipaddress.ip_network("10.70.1.0/24")], [])


def test_write_bytes(tmp_path: Path) -> None:
    path = tmp_path / "net.d" / "10-pybridge.conflist"
    assert write_bytes(str(path), b"a") is True
    assert write_bytes(str(path), b"a") is False
    assert write_bytes(str(path), b"b") is True
    assert path.read_bytes() == b"b" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert os.listdir(path.parent) == ["10-pybridge.conflist"]


def fake_bundle(root: Path, content: bytes) -> Path:
    (root / "_internal").mkdir(parents=True)
    (root / "pybridge").write_bytes(content)
    (root / "pybridge").chmod(0o755)
    (root / "pyipam").symlink_to("pybridge")
    (root / "_internal" / "lib.so").write_bytes(content * 2)
    return root


def test_install_bundle_links_the_compiled_client_when_the_bundle_has_one(tmp_path: Path) -> None:
    source = fake_bundle(tmp_path / "v1", b"v1")
    (source / "cni-client").write_bytes(b"client")
    (source / "cni-client").chmod(0o755)
    bin_dir, store = tmp_path / "host/opt/cni/bin", tmp_path / "host/opt/pybridge"
    final = install_bundle(str(source), str(bin_dir), str(store), "/opt/pybridge")
    for program in ("pybridge", "pyipam"):
        assert os.readlink(bin_dir / program) == f"/opt/pybridge/{Path(final).name}/cni-client"
    assert os.readlink(store / "current") == Path(final).name


def test_install_bundle_versioned_copy_and_symlink_switch(tmp_path: Path) -> None:
    bin_dir, store = tmp_path / "host/opt/cni/bin", tmp_path / "host/opt/pybridge"
    dirs = []
    for version in (b"v1", b"v2", b"v3"):
        source = fake_bundle(tmp_path / version.decode(), version)
        dirs.append(install_bundle(str(source), str(bin_dir), str(store), "/opt/pybridge"))
        for program in ("pybridge", "pyipam"):
            assert os.readlink(bin_dir / program) == f"/opt/pybridge/{Path(dirs[-1]).name}/pybridge"
        assert (Path(dirs[-1]) / "pybridge").read_bytes() == version
        assert os.readlink(store / "current") == Path(dirs[-1]).name
    # current and previous kept (an exec may have just resolved the old link), older removed
    assert sorted(os.listdir(store)) == sorted([*(Path(d).name for d in dirs[1:]), "current"])
    assert sorted(os.listdir(bin_dir)) == ["pybridge", "pyipam"]
    # installing the same bundle again changes nothing
    assert install_bundle(str(tmp_path / "v3"), str(bin_dir), str(store), "/opt/pybridge") == dirs[-1]


def test_frozen_entry_picks_the_program_by_name() -> None:
    assert program_for("/opt/cni/bin/pyipam") == "pyipam"
    assert program_for("pybridge") == "pybridge"
    assert program_for("/opt/pybridge/0123/pybridge") == "pybridge"


@pytest.mark.parametrize(
    ("runtime", "configured", "expected"),
    [
        ("containerd://2.1.4", "auto", "1.1.0"),  # kind's node images: STATUS needs 1.1.0
        ("containerd://1.6.20~ds1", "auto", "1.0.0"),  # Debian's: libcni 1.1.2 rejects a 1.1.0 result
        ("containerd://1.7.24", "auto", "1.0.0"),
        ("cri-o://1.30.0", "auto", "1.0.0"),
        ("", "auto", "1.0.0"),
        ("containerd://2.1.4", "1.0.0", "1.0.0"),  # configured wins
        ("containerd://1.6.20", "1.1.0", "1.1.0"),
    ],
)
def test_cni_version_follows_the_runtime(runtime: str, configured: str, expected: str) -> None:
    objects = load("nodes.json")["items"]
    for obj in objects:
        obj["status"]["nodeInfo"]["containerRuntimeVersion"] = runtime
    plan = model.desired(
        model.Settings(ME, cni_version=configured, cluster_cidrs=CLUSTER),
        [model.node_from_object(o) for o in objects], (), 1500
    )
    assert plan.conflist is not None and plan.conflist["cniVersion"] == expected


def _node(name: str, ip: str, *cidrs: str) -> model.Node:
    return model.Node(name, (ipaddress.ip_address(ip),), tuple(ipaddress.ip_network(c) for c in cidrs))


ROGUES = [_node("lan", "172.18.0.5", "192.168.50.0/24"), _node("half", "172.18.0.6", "128.0.0.0/1"),
          _node("v4-default", "172.18.0.7", "0.0.0.0/0"), _node("v6-default", "fc00::8", "::/0"),
          _node("wide", "172.18.0.9", "10.0.0.0/8")]


def test_podcidrs_outside_the_cluster_or_default_are_refused_for_routes_and_masquerade() -> None:
    me, good = _node(ME, "172.18.0.2", "10.70.1.0/24"), _node("good", "172.18.0.3", "10.70.2.0/24")
    plan = model.desired(model.Settings(ME, cluster_cidrs=CLUSTER), [me, good, *ROGUES], (), 1500)
    assert plan.routes == {R("10.70.2.0/24", "172.18.0.3")} == plan.route_sets
    assert sorted((r.reason, r.subject) for r in plan.refused) == [
        ("default-route", "node 'v4-default' podCIDR 0.0.0.0/0"),
        ("default-route", "node 'v6-default' podCIDR ::/0"),
        ("outside-cluster", "node 'half' podCIDR 128.0.0.0/1"),
        ("outside-cluster", "node 'lan' podCIDR 192.168.50.0/24"),
        ("outside-cluster", "node 'wide' podCIDR 10.0.0.0/8"),
    ]
    # masquerade is kept off only towards the cluster: a rogue podCIDR takes no one's masquerade
    assert "ip daddr != { 10.70.0.0/16, 224.0.0.0/4 } masquerade" in (plan.masquerade or "")


def test_no_cluster_cidr_or_own_podcidr_outside_it_waits() -> None:
    me = _node(ME, "172.18.0.2", "10.70.1.0/24")
    plan = model.desired(model.Settings(ME), [me, _node("b", "172.18.0.3", "10.70.2.0/24")], (), 1500)
    assert plan.waiting and "no cluster CIDR" in plan.waiting and plan.route_sets == frozenset()
    own_default = model.desired(model.Settings(ME, cluster_cidrs=CLUSTER),
                             [_node(ME, "172.18.0.2", "0.0.0.0/0")], (), 1500)
    assert own_default.waiting and "0.0.0.0/0 (default-route)" in own_default.waiting
    assert own_default.conflist is None


def test_a_foreign_route_is_never_replaced_and_owned_defaults_are_removed() -> None:
    me, b, c = (_node(ME, "172.18.0.2", "10.70.1.0/24"), _node("b", "172.18.0.3", "10.70.2.0/24"),
                _node("c", "172.18.0.4", "10.70.3.0/24"))
    owned = {R("10.70.3.0/24", "172.18.0.9"), R("::/0", "fc00::8")}  # c moved; a default of an old agent
    plan = model.desired(model.Settings(ME, cluster_cidrs=CLUSTER), [me, b, c], owned, 1500,
                      foreign_routes={"10.70.2.0/24", "0.0.0.0/0", "10.70.3.0/24"})
    assert plan.route_sets == {R("10.70.3.0/24", "172.18.0.4")}  # ours: replaced despite a foreign twin
    assert plan.route_deletes == {R("::/0", "fc00::8")}
    assert [(r.reason, r.subject) for r in plan.refused] == [("route-conflict", "route 10.70.2.0/24")]


def test_malformed_nodes_and_scoped_addresses_are_refused_at_the_edge() -> None:
    addresses = [{"type": "InternalIP", "address": "fd00::9%x"}, "junk",
                 {"type": "InternalIP", "address": "10.0.0.1"}]
    node = model.node_from_object({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["10.70.1.0/24", 7]},
                                   "status": {"addresses": addresses}})
    assert node.internal_ips == (ipaddress.ip_address("10.0.0.1"),)
    assert node.problems == ("spec.podCIDRs[1]: '7' is not a network",
                             "status.addresses[0].address: 'fd00::9%x' is not an address without a zone")
    bad: object
    for bad in ({"spec": {}}, {"metadata": {"name": ""}}, [], "x", {"metadata": "n"}):
        with pytest.raises(model.Malformed, match=r"metadata\.name"):
            model.node_from_object(bad)
    odd = model.node_from_object({"metadata": {"name": "o"}, "spec": "x", "status": {"addresses": {"a": 1},
                                                                                    "nodeInfo": []}})
    assert odd == model.Node("o")
