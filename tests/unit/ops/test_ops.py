"""The operator's side without root: metrics address parsing, conf discovery, pool size, the node
agent's readiness, and the exec path staying free of prometheus_client."""

from __future__ import annotations

import ipaddress
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cni_plugin.agent.observer import result_code
from cni_plugin.node import controller, model
from cni_plugin.ops import endpoint, networks
from cni_plugin.ops.node_metrics import NodeMetrics
from ipam.config import pool_size


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:9430", ("127.0.0.1", 9430)), ("[::1]:80", ("::1", 80)), ("off", None), ("OFF", None),
    ("node.example:1", ("node.example", 1))])
def test_metrics_address(value: str, expected: tuple[str, int] | None) -> None:
    assert endpoint.parse_address(value) == expected


@pytest.mark.parametrize("value", ["9430", ":9430", "host:", "host:0", "host:65536", "host:http", ""])
def test_metrics_address_refused(value: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        endpoint.parse_address(value)


def test_result_code() -> None:
    assert result_code(0, "") == 0
    assert result_code(1, '{"code": 11, "msg": "x"}') == 11
    assert result_code(1, "not json") == 999
    assert result_code(1, '{"code": true}') == 999


def _write(directory: Path, name: str, data: object) -> None:
    (directory / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_conf_discovery_order_and_errors(tmp_path: Path) -> None:
    ipam = {"type": "pyipam", "dataDir": "/x", "ranges": [[{"subnet": "10.1.0.0/24"}]]}
    _write(tmp_path, "20-b.conflist", {"cniVersion": "1.0.0", "name": "b",
                                        "plugins": [{"type": "pybridge", "bridge": "brb", "ipam": ipam}]})
    _write(tmp_path, "10-a.conf", {"cniVersion": "1.1.0", "name": "a", "type": "bridge", "ipam": ipam})
    _write(tmp_path, "30-bad.conflist", "{nope")
    _write(tmp_path, "40-noplugins.conflist", {"cniVersion": "1.1.0", "name": "c", "plugins": []})
    _write(tmp_path, "README", "ignored")
    confs = networks.load_all(str(tmp_path))
    assert [Path(c.path).name for c in confs] == ["10-a.conf", "20-b.conflist", "30-bad.conflist",
                                                  "40-noplugins.conflist"]
    assert (confs[0].name, confs[0].bridge, confs[1].bridge) == ("a", "cni0", "brb")
    assert confs[2].error and "cannot read" in confs[2].error
    assert confs[3].error and "plugins" in confs[3].error
    assert [cfg.network for _, cfg in networks.stores(confs)] == ["a", "b"]


@pytest.mark.parametrize(("ranges", "size"), [
    ([[{"subnet": "10.1.0.0/24"}]], 253),  # .1 gateway, .255 broadcast, .0 network
    ([[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.19"}]], 10),
    ([[{"subnet": "10.1.0.0/28"}], [{"subnet": "fd00::/124"}]], 13 + 14),  # v6 keeps ::f
])
def test_pool_size(tmp_path: Path, ranges: list[object], size: int) -> None:
    _write(tmp_path, "10.conflist", {"cniVersion": "1.1.0", "name": "n", "plugins": [
        {"type": "pybridge", "ipam": {"type": "pyipam", "ranges": ranges}}]})
    [(_conf, cfg)] = networks.stores(networks.load_all(str(tmp_path)))
    assert pool_size(cfg.ranges) == size


def test_range_use_per_range_set(tmp_path: Path) -> None:
    ranges = [[{"subnet": "10.1.0.0/29"}, {"subnet": "10.2.0.0/30"}], [{"subnet": "fd00::/126"}]]
    _write(tmp_path, "10.conflist", {"cniVersion": "1.1.0", "name": "n", "plugins": [
        {"type": "pybridge", "ipam": {"type": "pyipam", "ranges": ranges}}]})
    [(_conf, cfg)] = networks.stores(networks.load_all(str(tmp_path)))
    held = [ipaddress.ip_address(a) for a in ("10.1.0.2", "10.2.0.2", "10.1.0.1", "10.9.9.9", "fd00::3")]
    assert networks.range_use(cfg, held) == [
        networks.RangeUse("n", "10.1.0.0/29,10.2.0.0/30", "10.1.0.1-10.1.0.6,10.2.0.1-10.2.0.2", 2, 6),
        networks.RangeUse("n", "fd00::/126", "fd00::1-fd00::3", 1, 2)]
    assert networks.range_use(cfg, held)[0].free == 4


class _Effects:
    def routes(self) -> set[model.Route]:
        return set()

    def mtu(self, node: model.Node | None) -> int | None:
        return None

    def foreign_routes(self) -> set[str]:
        return set()

    def apply(self, plan: model.Desired) -> list[str]:
        return ["route failed"] if len(plan.routes) > 1 else []

    def resync(self) -> None:
        pass


def _node(name: str, cidr: str | None, ip: str) -> dict[str, object]:
    return {"metadata": {"name": name}, "spec": {"podCIDRs": [cidr] if cidr else []},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def test_node_metrics_follow_reconciles(tmp_path: Path) -> None:
    conflist = tmp_path / model.CONFLIST_NAME
    metrics = NodeMetrics(registry := CollectorRegistry(), str(conflist))
    settings = model.Settings(node_name="n1", cluster_cidrs=(ipaddress.ip_network("10.70.0.0/16"),))
    agent = controller.NodeController(settings, _Effects(), metrics)
    assert metrics.readiness() == "no Node list received yet"
    agent.handle("SYNC", [_node("n1", None, "172.18.0.2")])
    assert "podCIDR" in (metrics.readiness() or "")
    assert math.isnan(registry.get_sample_value("pybridge_node_seconds_since_last_sync") or 0.0)
    two = [_node("n1", "10.70.1.0/24", "172.18.0.2"), _node("n2", "10.70.2.0/24", "172.18.0.3")]
    agent.handle("SYNC", two)
    assert metrics.readiness() == f"conflist {conflist} not written"
    conflist.write_text("{}")
    assert metrics.readiness() is None
    assert registry.get_sample_value("pybridge_node_nodes") == 2
    assert registry.get_sample_value("pybridge_node_routes") == 1
    assert registry.get_sample_value("pybridge_node_reconciles_total") == 1
    assert 0 <= (registry.get_sample_value("pybridge_node_seconds_since_last_sync") or -1) < 60
    agent.handle("ADDED", _node("n3", "10.70.3.0/24", "172.18.0.4"))  # two routes: _Effects fails one
    assert registry.get_sample_value("pybridge_node_reconcile_errors_total") == 1
    assert registry.get_sample_value("pybridge_node_routes") == 2


EXEC_PATH = ("cni_plugin.shim", "cni_plugin.__main__", "cnikit.skel", "cni_plugin.verbs",
             "cni_plugin.ipam_client", "ipam.__main__", "ipam.verbs", "ipam.plugin", "cni_plugin.frozen")


def test_exec_path_does_not_import_metrics() -> None:
    """Every module a forwarded or in-process call may load leaves prometheus_client and
    cni_plugin.ops out: metrics cost the exec path nothing."""
    code = (f"import importlib, json, sys\nfor m in {EXEC_PATH!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
    assert "cni_plugin.verbs" in loaded and "ipam.plugin" in loaded
    assert not [m for m in loaded if m.startswith(("prometheus_client", "cni_plugin.ops"))]


def _get(port: int, path: str) -> tuple[int, str, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_endpoint_paths(tmp_path: Path) -> None:
    """The node controller's registry behind the endpoint (an ephemeral loopback port)."""
    conflist = tmp_path / model.CONFLIST_NAME
    metrics = NodeMetrics(registry := CollectorRegistry(), str(conflist))
    metrics.checks = endpoint.Readiness()
    metrics.checks.add("node controller", metrics.readiness)
    server = endpoint.Endpoint(("127.0.0.1", 0), metrics.checks, registry)
    health = endpoint.Endpoint(("127.0.0.1", 0), metrics.checks)
    try:
        assert _get(server.port, "/healthz")[::2] == (200, "ok\n")
        assert _wait_ready(server.port, 503, "no Node list received yet\n")
        conflist.write_text("{}")
        metrics.reconciled(nodes=3, routes=2, errors=0, full_sync=True)  # refreshes readiness
        assert _wait_ready(server.port, 200) == "ok\n"
        assert _get(health.port, "/readyz")[::2] == (200, "ok\n")
        status, kind, body = _get(server.port, "/metrics")
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        assert "pybridge_node_nodes 3.0" in body.splitlines()
        assert _get(server.port, "/other")[0] == 404
        assert _get(health.port, "/metrics")[0] == 404  # health alone: nothing to render there
    finally:
        server.close()
        health.close()
        metrics.checks.close()


def _wait_ready(port: int, status: int, body: str | None = None) -> str:
    """The /readyz body once it answers `status` (and `body`, if given): readiness is checked
    apart from requests, and a check run before the registry had any says so for a moment."""
    deadline = time.monotonic() + 5
    while (got := _get(port, "/readyz"))[0] != status or body not in (None, got[2]):
        assert time.monotonic() < deadline, got
        time.sleep(0.02)
    return got[2]


def test_doctor_warns_from_90_percent_of_a_range_set(tmp_path: Path) -> None:
    from cni_plugin.ops import doctor
    from ipam.plugin import ipam_add

    ranges = [[{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.19"}],
              [{"subnet": "fd00::/120"}]]
    ipam = {"type": "pyipam", "dataDir": str(tmp_path / "data"), "ranges": ranges}
    conf = {"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "pybridge", "ipam": ipam}]}
    (tmp_path / "conf").mkdir()
    _write(tmp_path / "conf", "10.conflist", conf)
    node = doctor.Node(conf_dir=str(tmp_path / "conf"), bin_dir=str(tmp_path))
    netconf = {**conf["plugins"][0], "name": "n", "cniVersion": "1.1.0"}
    for i in range(8):
        ipam_add(netconf, f"c{i}", "eth0", {})
    assert doctor.check_pools(node).status == doctor.OK  # 8 of 10
    ipam_add(netconf, "c8", "eth0", {})
    check = doctor.check_pools(doctor.Node(conf_dir=str(tmp_path / "conf"), bin_dir=str(tmp_path)))
    assert (check.status, check.message) == (
        doctor.WARN, "range set(s) at 90% use or more: network n 10.1.0.0/24: 9 of 10 in use")
