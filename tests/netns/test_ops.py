"""`pybridge ls`, `pybridge doctor` and the agent's metrics, on a throw-away host netns.

Every fault doctor must name is injected here, inside the test's own netns and dirs; each test
runs with and without the agent (the host fixture)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cni_plugin.agent import wire
from cni_plugin.ops import endpoint
from ipam.watch import Watch
from testbed.harness import Host, bridge_conf, sh

from .ops import agent_env, doctor, http_get, http_gets, ls, ops_conf, pybridge, restart_agent, write_conf
from .test_agent import FakeAgent

pytestmark = pytest.mark.netns


def _veth(result: dict[str, Any]) -> str:
    return str(next(i["name"] for i in result["interfaces"] if i["name"].startswith("veth")))


def test_ls_states(host: Host, tmp_path: Path) -> None:
    conf = ops_conf(host)
    conf_dir, cache = write_conf(tmp_path / "conf", conf), tmp_path / "cache"
    pods = {cid: host.new_pod() for cid in ("c-ok", "c-noveth", "c-noresv", "c-gone")}
    results = {cid: host.add(conf, pod, container_id=cid) for cid, pod in pods.items()}
    address = {cid: r["ips"][0]["address"].split("/")[0] for cid, r in results.items()}
    host.exec("ip", "link", "del", _veth(results["c-noveth"]))
    os.unlink(host.data_dir / "testnet" / address["c-noresv"])
    cache.mkdir()  # what libcni's cache records for an attachment, netns path included
    (cache / "testnet-c-gone-eth0").write_text(json.dumps({"kind": "cniCacheV1", "containerId": "c-gone",
                                                           "netns": f"/run/netns/{pods['c-gone']}"}))
    host.exec("ip", "netns", "del", pods["c-gone"])

    rows = ls(host, conf_dir, cache)
    assert rows["c-ok"]["state"] == "ok"
    assert rows["c-ok"]["addresses"] == [address["c-ok"]]
    assert (rows["c-ok"]["host_veth"], rows["c-ok"]["netns"]) == (_veth(results["c-ok"]), pods["c-ok"])
    assert rows["c-ok"]["ifname"] == "eth0" and rows["c-ok"]["age_seconds"] >= 0
    assert rows["c-noveth"]["state"] == "reservation without veth"
    unreserved = rows[_veth(results["c-noresv"])]
    assert unreserved["state"] == "veth without reservation"
    assert (unreserved["addresses"], unreserved["netns"]) == ([address["c-noresv"]], pods["c-noresv"])
    assert rows["c-gone"]["state"] == "netns gone"
    assert len(rows) == 4

    code, table = pybridge(host, "ls", "--conf-dir", str(conf_dir), "--cache-dir", str(cache))
    assert code == 0 and table.splitlines()[0].split()[:3] == ["NETWORK", "CONTAINER", "IFNAME"]
    assert "veth without reservation" in table and "netns gone" in table


def _healthy(host: Host, tmp_path: Path, **overrides: Any) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    conf = ops_conf(host, **overrides)
    conf_dir = write_conf(tmp_path / "conf", conf)
    result = host.add(conf, host.new_pod())
    return conf, conf_dir, result


def test_doctor_healthy_node(host: Host, tmp_path: Path) -> None:
    conf_dir = _healthy(host, tmp_path)[1]
    code, checks = doctor(host, conf_dir)
    names = ("dirs", "conflist", "cniVersion", "chains", "agent", "ip_forward", "br_netfilter", "stores",
             "pools", "attachments", "mtu", "masquerade", "netpolicy")
    expected = dict.fromkeys(names, "ok")
    if host.agent is None:
        expected["agent"] = "warn"
        assert "no agent" in checks["agent"]["message"]
    assert {name: c["status"] for name, c in checks.items()} == expected
    assert code == 0


def _root_sysctls() -> list[str | None]:
    values = []
    for name in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        try:
            values.append(Path("/proc/sys", name).read_text())
        except OSError:
            values.append(None)
    return values


# With no conf dir there is no conflist either; an unsafe store is refused by the checks that read it.
# A cniVersion no plugin speaks is also every plugin's incompatibility (chains).
CASCADE = {"conf dir": {"conflist"}, "store mode": {"attachments", "masquerade"}, "cniVersion": {"chains"}}
FAULTS = ["conf dir", "plugin", "cniVersion", "ip_forward", "br_netfilter", "store mode", "stale", "mtu",
          "masquerade", "refused policy"]


def _refused_policy(host: Host, result: dict[str, Any]) -> None:
    """The node controller's rules for a policy with an except it cannot read, selecting the pod."""
    from cni_plugin.node.netpol import apply
    from cni_plugin.node.netpol.policy_controller import PolicyController

    nft = ["ip", "netns", "exec", host.name, "nft"]
    agent = PolicyController("n1", lambda script: apply.replace(script, nft), lambda *_a, **_k: None)
    bad = {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/33"]}}]}]}
    agent.handle("NetworkPolicy", "SYNC", [{"metadata": {"name": "bad", "namespace": "x"}, "spec": bad}])
    agent.handle("Pod", "SYNC", [{"metadata": {"name": "a", "namespace": "x"}, "spec": {"nodeName": "n1"},
                                  "status": {"podIP": result["ips"][0]["address"].split("/")[0]}}])
    agent.handle("Namespace", "SYNC", [])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    assert agent.reconcile()


def _inject(fault: str, host: Host, conf: dict[str, Any], conf_dir: Path, result: dict[str, Any]) -> tuple[
        str, str, str]:
    """Break one thing; returns (check, status, words its message must contain)."""
    if fault == "conf dir":
        for path in conf_dir.iterdir():
            path.unlink()
        conf_dir.rmdir()
        return "dirs", "fail", str(conf_dir)
    if fault == "plugin":
        write_conf(conf_dir, {**conf, "type": "nosuchplugin"})
        return "conflist", "fail", "nosuchplugin"
    if fault == "cniVersion":
        write_conf(conf_dir, {**conf, "cniVersion": "9.9.9"})
        return "cniVersion", "fail", "9.9.9"
    if fault == "ip_forward":
        host.exec("sysctl", "-qw", "net.ipv4.ip_forward=0")
        return "ip_forward", "fail", "ip_forward is 0"
    if fault == "br_netfilter":
        host.exec("nft", "add table ip nat; add chain ip nat KUBE-SERVICES")  # what kube-proxy leaves
        if not os.path.exists("/proc/sys/net/bridge"):
            return "br_netfilter", "fail", "not loaded"
        host.exec("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")
        return "br_netfilter", "fail", "bridge-nf-call-iptables is 0"
    if fault == "store mode":
        os.chmod(host.data_dir / "testnet", 0o777)
        return "stores", "fail", f"{host.data_dir / 'testnet'} has mode 0777"
    if fault == "stale":
        host.exec("ip", "link", "del", _veth(result))
        return "attachments", "warn", "reservation without veth"
    if fault == "mtu":
        host.exec("ip", "link", "add", "up0", "mtu", "1400", "type", "veth", "peer", "name", "up0-peer")
        host.exec("ip", "link", "set", "up0", "up")
        host.exec("ip", "route", "add", "default", "dev", "up0")
        return "mtu", "fail", "(up0 1400): br-test 1500"
    if fault == "refused policy":
        _refused_policy(host, result)
        return "netpolicy", "warn", "x/bad (spec.ingress.0.from.0.ipBlock.except.0)"
    assert fault == "masquerade"
    host.exec("nft", "flush table inet pybridge")
    return "masquerade", "fail", result["ips"][0]["address"].split("/")[0]


@pytest.mark.parametrize("fault", FAULTS)
def test_doctor_names_fault(host: Host, tmp_path: Path, fault: str) -> None:
    root_before = _root_sysctls()
    conf, conf_dir, result = _healthy(host, tmp_path)
    name, status, words = _inject(fault, host, conf, conf_dir, result)
    code, checks = doctor(host, conf_dir)
    assert checks[name]["status"] == status, checks[name]
    assert words in checks[name]["message"], checks[name]
    assert checks[name]["fix"]
    failed = {n for n, c in checks.items() if c["status"] == "fail"}
    assert failed == ({name} if status == "fail" else set()) | CASCADE.get(fault, set()), checks
    assert code == (1 if status == "fail" else 0)
    assert _root_sysctls() == root_before  # the faults stayed in the test's netns


def test_doctor_names_an_agent_of_another_version(host: Host, tmp_path: Path) -> None:
    if host.agent is not None:
        pytest.skip("needs the agent's socket path free")
    conf_dir = _healthy(host, tmp_path)[1]
    old = json.dumps({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0"]}).encode()
    agent = FakeAgent(host.agent_socket, wire.ACCEPTED + wire.encode_response(0, old, b""))
    try:
        code, checks = doctor(host, conf_dir)
    finally:
        agent.close()
    assert agent.calls == 1
    assert checks["agent"]["status"] == "fail" and code == 1
    assert "agent speaks ['0.3.0', '0.3.1', '0.4.0']" in checks["agent"]["message"]
    assert "restart the agent" in checks["agent"]["fix"]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(host: Host) -> Samples:
    time.sleep(endpoint.RENDER_INTERVAL)  # the exposition is rendered at most once per interval
    ok, body = http_get(host, "/metrics")
    assert ok, body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_agent_metrics_and_health(host: Host, tmp_path: Path) -> None:
    if host.agent is None:
        pytest.skip("the agent's endpoint: agent mode only")
    conf = ops_conf(host)
    conf_dir = write_conf(tmp_path / "conf", conf)
    restart_agent(host, tmp_path / "agent-metrics.log", agent_env(conf_dir))
    assert http_get(host, "/healthz") == (True, "ok\n")
    assert _ready_reason(host, lambda body: body == "ok\n") == "ok\n"
    pods = [host.new_pod() for _ in range(3)]
    for i, pod in enumerate(pods):
        host.add(conf, pod, container_id=f"m{i}")
    assert host.cni("DEL", conf, pods[0], container_id="m0").ok
    check = host.cni("CHECK", conf, pods[0], container_id="m0")  # deleted: a CHECK error
    assert not check.ok
    # a client in another netns (a pod's) is declined, then served in-process (STATUS: VERSION
    # never reaches the agent, the compiled client answers it)
    status = sh("ip", "netns", "exec", pods[1], "env", "-i", "CNI_COMMAND=STATUS", "CNI_PATH=/nonexistent",
                f"PYBRIDGE_AGENT_SOCKET={host.agent_socket}", str(host.bin_dir / "pybridge"),
                input=json.dumps({**conf, "cniVersion": "1.1.0"}).encode())
    assert status.returncode == 0 and status.stdout == b"", status
    samples = _scrape(host)
    calls = "pybridge_cni_calls_total"
    assert _value(samples, calls, program="pybridge", verb="ADD", code="0") == 3
    assert _value(samples, calls, program="pybridge", verb="DEL", code="0") == 1
    assert _value(samples, calls, program="pybridge", verb="CHECK", code=str(check.out["code"])) == 1
    latency = "pybridge_cni_operation_duration_seconds_count"
    assert _value(samples, latency, program="pybridge", verb="ADD") == 3
    assert _value(samples, "pybridge_cni_calls_in_flight") == 0
    assert _value(samples, "pybridge_cni_calls_declined_total") == 1
    assert _value(samples, "pybridge_cni_calls_without_turn_total") == 0
    assert _value(samples, calls, program="pybridge", verb="STATUS", code="0") is None  # not served here
    assert _value(samples, "pybridge_ipam_pool_addresses", network="testnet") == 253
    assert _value(samples, "pybridge_ipam_reserved_addresses", network="testnet") == 2
    assert _value(samples, "pybridge_ipam_free_addresses", network="testnet") == 251
    in_range = {"network": "testnet", "subnet": "10.88.0.0/24", "range": "10.88.0.1-10.88.0.254"}
    assert _value(samples, "pybridge_ipam_range_used_addresses", **in_range) == 2
    assert _value(samples, "pybridge_ipam_range_free_addresses", **in_range) == 251
    assert not http_get(host, "/nothing")[0]

    valid = [{"containerID": "m1", "ifname": "eth0"}]
    gc = {**conf, "cniVersion": "1.1.0", "cni.dev/valid-attachments": valid}
    assert host.cni("GC", gc).ok  # releases m2's address
    samples = _scrape(host)
    assert _value(samples, "pybridge_ipam_gc_released_addresses_total", network="testnet") == 1
    assert _value(samples, "pybridge_ipam_reserved_addresses", network="testnet") == 1


# An exec'd IPAM plugin that, on ADD, blocks until the test creates `go` (at most 15 s).
SLOW_IPAM = """#!/bin/sh
[ "$CNI_COMMAND" = ADD ] || exit 0
touch "{dir}/started.$CNI_CONTAINERID"
i=0
while [ ! -e "{dir}/go" ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done
printf '{{"cniVersion":"1.0.0","ips":[{{"address":"10.89.0.%d/24"}}]}}' $((${{CNI_CONTAINERID#slow}} + 10))
"""


def test_calls_blocked_in_an_exec_d_ipam_plugin_lend_their_turns(host: Host, tmp_path: Path) -> None:
    # Two calls at once have a turn (cnikit/turns.py). Two ADDs stuck in their IPAM plugin must
    # not keep a third call waiting for one: it gets a turn, and none runs without.
    if host.agent is None:
        pytest.skip("the agent's turns: agent mode only")
    conf = ops_conf(host)
    restart_agent(host, tmp_path / "agent-turns.log", agent_env(write_conf(tmp_path / "conf", conf)))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    script = plugins / "slowipam"
    script.write_text(SLOW_IPAM.format(dir=plugins))
    script.chmod(0o755)
    slow_conf = bridge_conf(host, name="slownet", bridge="br-slow", ipam={"type": "slowipam"})
    env = {"CNI_PATH": f"{plugins}:{host.bin_dir}"}
    pods = [host.new_pod() for _ in range(3)]
    replies: dict[int, Any] = {}

    def slow_add(i: int) -> None:
        replies[i] = host.cni("ADD", slow_conf, pods[i], container_id=f"slow{i}", env=env)

    threads = [threading.Thread(target=slow_add, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while not all((plugins / f"started.slow{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "the slow IPAM plugin was never called"
            time.sleep(0.02)
        host.add(conf, pods[2], container_id="quick")
        assert not (plugins / "go").exists() and all(t.is_alive() for t in threads)
        assert _value(_scrape(host), "pybridge_cni_calls_without_turn_total") == 0
    finally:
        (plugins / "go").touch()
        for thread in threads:
            thread.join(30)
    assert all(replies[i].ok for i in range(2)), replies
    for i in range(2):
        assert host.cni("DEL", slow_conf, pods[i], container_id=f"slow{i}", env=env).ok
    assert host.cni("DEL", conf, pods[2], container_id="quick").ok


def test_agent_not_ready_when_store_unwritable(host: Host, tmp_path: Path) -> None:
    if host.agent is None:
        pytest.skip("the agent's endpoint: agent mode only")
    conf = ops_conf(host)
    conf["ipam"]["dataDir"] = "/proc/pybridge-h15-readonly"  # cannot be created, even by root
    conf_dir = write_conf(tmp_path / "conf", conf)
    restart_agent(host, tmp_path / "agent-ready.log", agent_env(conf_dir))
    reason = _ready_reason(host, lambda body: "IPAM store" in body)
    assert reason.startswith("IPAM store of network testnet: cannot open the IPAM store"), reason
    statuses, _ = http_gets(host, "/readyz", 3)
    assert statuses == {503: 3}


def _ready_reason(host: Host, wanted: Callable[[str], bool]) -> str:
    """The /readyz body once `wanted` (readiness is checked apart from the requests, so it
    follows the agent within a check interval)."""
    deadline = time.monotonic() + 3 * endpoint.READINESS_INTERVAL
    while not wanted(body := http_gets(host, "/readyz")[1]):
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def _inotify_events(watch: Watch) -> int:
    """Events queued on `watch` since the last call."""
    count = 0
    with contextlib.suppress(BlockingIOError):
        while data := os.read(watch.fd, 65536):
            offset = 0
            while offset < len(data):
                size = struct.unpack_from("=iIII", data, offset)[3]
                offset += 16 + size
                count += 1
    return count


def test_readyz_flood_touches_no_file(host: Host, tmp_path: Path) -> None:
    """100 /readyz in a row: every one answered, and the IPAM store directory sees no more
    changes than the periodic checks make (main: a probe file created and removed per request)."""
    if host.agent is None:
        pytest.skip("the agent's endpoint: agent mode only")
    conf = ops_conf(host)
    conf_dir = write_conf(tmp_path / "conf", conf)
    restart_agent(host, tmp_path / "agent-flood.log", agent_env(conf_dir))
    _ready_reason(host, lambda body: body == "ok\n")
    store = host.data_dir / "testnet"
    watch = Watch()
    dir_fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        watch.rewatch(dir_fd)
        started = time.monotonic()
        statuses, _ = http_gets(host, "/readyz", 100)
        # the periodic checks in the window, plus one already under way as it opened
        checks = 2 + int((time.monotonic() - started) / endpoint.READINESS_INTERVAL)
        events = _inotify_events(watch)
    finally:
        os.close(dir_fd)
        watch.close()
    assert statuses == {200: 100}
    assert events <= 2 * checks, (events, checks)  # a check: the probe file created, then removed
