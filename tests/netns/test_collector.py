"""The collector of attachments the runtime forgot, on a throw-away host netns: `pybridge gc` by
hand, and the agent's periodic collector with its metrics. A pod whose netns is deleted without
a DEL (what a runtime crash or a wiped runtime state leaves) loses its reservation, masquerade
rule and cache entry after two observations; a live pod and one whose DEL is in flight keep
theirs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import nsrecord
from testbed.harness import REFERENCE_PLUGINS, Host, Reply, bridge_conf

from .ops import agent_env, http_get, ls, ops_conf, pybridge, restart_agent, write_conf

pytestmark = pytest.mark.netns


def _address(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"].split("/")[0])


def _cache(cache: Path, container_id: str, pod: str, netns: str = "") -> Path:
    """libcni's cache entry (1.2 and later record the netns path)."""
    cache.mkdir(exist_ok=True)
    path = cache / f"testnet-{container_id}-eth0"
    path.write_text(json.dumps({"kind": "cniCacheV1", "containerId": container_id, "ifName": "eth0",
                                "networkName": "testnet", "netns": netns or f"/run/netns/{pod}"}))
    return path


def _kill_netns(host: Host, pod: str, veths_left: int) -> None:
    """The pod's netns deleted with no DEL; its veth goes with it once the kernel destroys it."""
    host.exec("ip", "netns", "del", pod)
    host.pods.remove(pod)
    assert len(host.settle_veths(veths_left)) == veths_left


def _masqueraded(host: Host) -> set[str]:
    """The pod addresses the host netns' nftables masquerade."""
    ruleset = host.exec("nft", "-j", "list", "ruleset").stdout
    found = set()
    for item in json.loads(ruleset)["nftables"]:
        rule = item.get("rule")
        if not rule or not any("masquerade" in e for e in rule["expr"]):
            continue
        for e in rule["expr"]:
            match = e.get("match", {})
            if match.get("left", {}).get("payload", {}).get("field") == "saddr":
                found.add(str(match["right"]))
    return found


def test_gc_by_hand(host: Host, tmp_path: Path) -> None:
    conf = ops_conf(host)
    conf_dir, cache = write_conf(tmp_path / "conf", conf), tmp_path / "cache"
    live, gone = host.new_pod(), host.new_pod()
    results = {"c-live": host.add(conf, live, container_id="c-live"),
               "c-gone": host.add(conf, gone, container_id="c-gone")}
    cached = {"c-live": _cache(cache, "c-live", live), "c-gone": _cache(cache, "c-gone", gone)}
    address = {cid: _address(r) for cid, r in results.items()}
    assert _masqueraded(host) == set(address.values())
    _kill_netns(host, gone, 1)
    args = ("gc", "--json", "--conf-dir", str(conf_dir), "--cache-dir", str(cache), "--confirm-after", "1",
            "--min-age", "0", "--runtime-socket", "off")

    code, out = pybridge(host, *args, "--dry-run")
    assert code == 0, out
    assert {r["container_id"]: r["verdict"] for r in json.loads(out)} == {
        "c-live": "netns exists", "c-gone": "would release"}
    assert sorted(host.reservations("testnet")) == sorted(address.values())

    code, out = pybridge(host, *args)
    assert code == 0, out
    assert {r["container_id"]: r["verdict"] for r in json.loads(out)} == {
        "c-live": "netns exists", "c-gone": "released"}
    assert list(host.reservations("testnet")) == [address["c-live"]]
    assert _masqueraded(host) == {address["c-live"]}
    assert cached["c-live"].exists() and not cached["c-gone"].exists()
    assert host.ping(live, "10.88.0.1")  # the live pod kept its address and its way out

    code, out = pybridge(host, *args[:-2], "--runtime-socket", str(tmp_path / "absent.sock"))
    assert code == 1 and out == ""


def test_without_libcni_cache_pybridges_own_netns_record_decides(host: Host, tmp_path: Path) -> None:
    """No cache entry at all (libcni 1.1, or an ADD killed before libcni wrote it): the netns path
    pybridge recorded at ADD tells the gone pod from the live one; DEL removes the record."""
    conf = ops_conf(host)
    conf_dir, cache = write_conf(tmp_path / "conf", conf), tmp_path / "cache"
    live, gone = host.new_pod(), host.new_pod()
    address = {cid: _address(host.add(conf, pod, container_id=cid)) for cid, pod in
               (("c-live", live), ("c-gone", gone))}
    records = host.data_dir / ".pybridge-netns" / "testnet"
    assert sorted(os.listdir(records)) == ["c-gone:eth0", "c-live:eth0"]
    assert (records / "c-live:eth0").read_text() == f"/run/netns/{live}"
    _kill_netns(host, gone, 1)

    code, out = pybridge(host, "gc", "--json", "--conf-dir", str(conf_dir), "--cache-dir", str(cache),
                         "--confirm-after", "1", "--min-age", "0", "--runtime-socket", "off")
    assert code == 0, out
    assert {r["container_id"]: r["verdict"] for r in json.loads(out)} == {
        "c-live": "netns exists", "c-gone": "released"}
    assert list(host.reservations("testnet")) == [address["c-live"]]
    assert _masqueraded(host) == {address["c-live"]}
    assert os.listdir(records) == ["c-live:eth0"]
    assert host.ping(live, "10.88.0.1")


def test_a_record_an_add_killed_before_reserving_left_goes(host: Host, tmp_path: Path) -> None:
    """An ADD killed between its netns record and its reservation: no DEL ever comes for the
    record. The collector removes it (its netns is gone); a live pod's record stays."""
    conf = ops_conf(host)
    conf_dir = write_conf(tmp_path / "conf", conf)
    live, gone = host.new_pod(), host.new_pod()
    host.add(conf, live, container_id="c-live")
    nsrecord.write(str(host.data_dir), "testnet", "c-killed", "eth0", f"/run/netns/{gone}")
    records = host.data_dir / ".pybridge-netns" / "testnet"
    assert sorted(os.listdir(records)) == ["c-killed:eth0", "c-live:eth0"]
    args = ("gc", "--json", "--conf-dir", str(conf_dir), "--cache-dir", str(tmp_path / "cache"),
            "--confirm-after", "0", "--min-age", "0", "--runtime-socket", "off")
    assert pybridge(host, *args)[0] == 0
    assert sorted(os.listdir(records)) == ["c-killed:eth0", "c-live:eth0"]  # its netns still exists
    _kill_netns(host, gone, 1)
    assert pybridge(host, *args, "--dry-run")[0] == 0
    assert sorted(os.listdir(records)) == ["c-killed:eth0", "c-live:eth0"]  # a dry run removes nothing
    assert pybridge(host, *args)[0] == 0
    assert os.listdir(records) == ["c-live:eth0"]


def test_a_pod_in_no_named_netns_is_read_through_its_cached_path(host: Host, tmp_path: Path) -> None:
    """containerd's pins under its state dir are in no /run/netns name: the veth's peer is read
    through the recorded path (here libcni's cache), else every candidate on the bridge would be
    kept as undecidable."""
    conf = ops_conf(host)
    conf_dir, cache = write_conf(tmp_path / "conf", conf), tmp_path / "cache"
    live, gone = host.new_pod(), host.new_pod()
    address = _address(host.add(conf, live, container_id="c-live"))
    host.add(conf, gone, container_id="c-gone")
    holder = subprocess.Popen(["ip", "netns", "exec", live, "sleep", "120"])  # ip execs sleep: same pid
    try:
        netns = f"/proc/{holder.pid}/ns/net"
        _wait_for(lambda: os.readlink(netns) != os.readlink("/proc/self/ns/net"))
        _cache(cache, "c-live", live, netns)
        _cache(cache, "c-gone", gone)
        # No pybridge record (attachments made before pybridge kept them): libcni's cache is read.
        for record in (host.data_dir / ".pybridge-netns" / "testnet").iterdir():
            record.unlink()
        host.exec("ip", "netns", "del", live)  # the name goes; the netns lives on in the process
        host.pods.remove(live)
        _kill_netns(host, gone, 1)
        rows = ls(host, conf_dir, cache)
        assert (rows["c-live"]["state"], rows["c-live"]["netns"]) == ("ok", netns)
        assert rows["c-live"]["addresses"] == [address]
        code, out = pybridge(host, "gc", "--json", "--dry-run", "--conf-dir", str(conf_dir), "--cache-dir",
                             str(cache), "--confirm-after", "1", "--min-age", "0", "--runtime-socket", "off")
        assert code == 0, out
        assert {r["container_id"]: r["verdict"] for r in json.loads(out)} == {
            "c-live": "netns exists", "c-gone": "would release"}
    finally:
        holder.kill()
        holder.wait()


def _hostlocal_conf(host: Host) -> dict[str, Any]:
    """The test network on the reference host-local IPAM, exec'd through CNI_PATH, where a
    stand-in makes one DEL slow."""
    return bridge_conf(host, cniVersion="1.0.0", ipMasq=True,
                       ipam={"type": "host-local", "dataDir": str(host.data_dir),
                             "ranges": [[{"subnet": "10.88.0.0/24"}]]})


SLOW_HOST_LOCAL = """#!/bin/sh
# host-local, with each DEL for container c-busy held for a few seconds and logged
if [ "$CNI_COMMAND" = DEL ] && [ "$CNI_CONTAINERID" = c-busy ]; then
    echo start >> {log}; sleep 5; echo end >> {log}
fi
exec {reference}/host-local
"""


@pytest.fixture
def runtime_socket(tmp_path: Path) -> Iterator[Path]:
    """A listening socket standing in for the runtime's."""
    path = tmp_path / "runtime.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    yield path
    sock.close()


def _samples(host: Host, name: str) -> dict[str, float]:
    """label value -> sample of one labelled metric of the agent's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    ok, body = http_get(host, "/metrics")
    assert ok, body
    return {next(iter(s.labels.values())): s.value for family in text_string_to_metric_families(body)
            for s in family.samples if s.name == name}


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e.get("event") == name]


def _agent(host: Host, tmp_path: Path, conf: dict[str, Any], runtime: Path, cni_path: str) -> Path:
    log = tmp_path / "agent-events.jsonl"
    env = {**agent_env(write_conf(tmp_path / "conf", conf)), "PYBRIDGE_LOG_FILE": str(log),
           "PYBRIDGE_CNI_CACHE_DIR": str(tmp_path / "cache"), "PYBRIDGE_GC_INTERVAL": "1",
           "PYBRIDGE_GC_MIN_AGE": "0", "PYBRIDGE_GC_RUNTIME_SOCKET": str(runtime), "CNI_PATH": cni_path}
    restart_agent(host, tmp_path / "agent.log", env)
    return log


def _wait_for(what: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_agent_collects_after_two_observations_and_never_beside_a_call(
        host: Host, tmp_path: Path, runtime_socket: Path) -> None:
    if host.agent is None:
        pytest.skip("the agent's collector: agent mode only")
    slow = tmp_path / "slowbin"
    slow.mkdir()
    calls = tmp_path / "busy-dels"
    (slow / "host-local").write_text(SLOW_HOST_LOCAL.format(log=calls, reference=REFERENCE_PLUGINS))
    (slow / "host-local").chmod(0o755)
    cni_path = f"{slow}:{host.bin_dir}:{REFERENCE_PLUGINS}"
    conf = _hostlocal_conf(host)
    log = _agent(host, tmp_path, conf, runtime_socket, cni_path)
    cache = tmp_path / "cache"
    pods = {cid: host.new_pod() for cid in ("c-live", "c-gone", "c-busy")}
    address = {}
    for cid, pod in pods.items():
        address[cid] = _address(host.add(conf, pod, container_id=cid))
        _cache(cache, cid, pod)

    # c-busy: its DEL is in flight (held in IPAM) when its netns goes, for several collector runs
    replies: list[Reply] = []
    deleting = threading.Thread(target=lambda: replies.append(host.cni(
        "DEL", conf, pods["c-busy"], container_id="c-busy", env={"CNI_PATH": cni_path})))
    deleting.start()
    _wait_for(lambda: calls.exists())
    _kill_netns(host, pods["c-busy"], 2)
    _kill_netns(host, pods["c-gone"], 1)
    deleting.join(30)
    assert replies and replies[0].ok, replies
    assert calls.read_text().split() == ["start", "end"]  # the collector's DEL never ran beside it

    _wait_for(lambda: list(host.reservations("testnet")) == [address["c-live"]])
    released = _events(log, "gc_released")
    assert [e["container_id"] for e in released] == ["c-gone"], released
    assert _masqueraded(host) == {address["c-live"]}
    assert not (cache / "testnet-c-gone-eth0").exists() and (cache / "testnet-c-live-eth0").exists()
    assert host.ping(pods["c-live"], "10.88.0.1")
    assert _samples(host, "pybridge_gc_released_total") == {"testnet": 1}
    assert _samples(host, "pybridge_gc_runs_total").get("done", 0) >= 2


def test_an_unreachable_runtime_makes_the_agent_collect_nothing(host: Host, tmp_path: Path) -> None:
    if host.agent is None:
        pytest.skip("the agent's collector: agent mode only")
    conf = ops_conf(host)
    log = _agent(host, tmp_path, conf, tmp_path / "absent.sock", str(host.bin_dir))
    pod = host.new_pod()
    address = _address(host.add(conf, pod, container_id="c-gone"))
    _cache(tmp_path / "cache", "c-gone", pod)
    _kill_netns(host, pod, 0)
    _wait_for(lambda: _samples(host, "pybridge_gc_runs_total").get("runtime_unreachable", 0) >= 4)
    assert list(host.reservations("testnet")) == [address]
    skipped = _events(log, "gc_skipped")
    assert len(skipped) == 1 and "absent.sock" in skipped[0]["reason"]
    assert _events(log, "gc_released") == []
