"""The node controller never dies and never stalls (issue 30): a silent watch, an ERROR event without
a message, objects the client's models refuse, a 410 storm, a hung nft, no service account.

Tests that open sockets or touch routes and nftables run inside a throw-away netns of their own
(the test thread enters it; the threads it starts stay there).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import urllib3
from prometheus_client import CollectorRegistry

from cni_plugin import nft
from cni_plugin.nft import NftError
from cni_plugin.node import controller, effects, kube, loop, model
from cni_plugin.node.netpol import policy_controller as netpol
from cni_plugin.node.netpol.objects import Refusal
from cni_plugin.ops import endpoint
from cni_plugin.ops.node_metrics import NodeMetrics
from testbed.harness import delete_netns, new_netns, sh

from ..netns.test_masq import inside
from .apiserver import ApiServer, FakePool, NodeStore, api_client, load, node_object
from .test_node_kube import CLUSTER, ME, Recorder, routes_of

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
TOKEN = "robust-token"


@contextlib.contextmanager
def own_netns() -> Iterator[str]:
    """A fresh netns with lo up, this thread inside it for the block; removed after."""
    name = new_netns("robust")
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        with inside(name):
            yield name
    finally:
        delete_netns(name)


def serve(store: NodeStore) -> ApiServer:
    """The fake API over plain HTTP on this netns's loopback."""
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(16)
    return ApiServer(store, listen, None, None, TOKEN)


def kubeconfig(path: Path, server: ApiServer) -> str:
    host, port = server.httpd.socket.getsockname()[:2]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://{host}:{port}"}}],
        "users": [{"name": "t", "user": {"token": TOKEN}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    return str(path)


def feed(api: Any, agent: controller.NodeController, stop: threading.Event,
         timeout_seconds: int) -> threading.Thread:
    def run() -> None:
        for kind, payload in kube.node_events(api, timeout_seconds=timeout_seconds, stop=stop.is_set):
            agent.handle(kind, payload)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


@needs_root
def test_a_black_holed_watch_times_out_and_the_relist_finds_a_new_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # read deadline: timeoutSeconds + 1 s (raising=False: the test must run, and fail, without it)
    monkeypatch.setattr(kube, "WATCH_READ_GRACE", 1.0, raising=False)
    stop = threading.Event()
    with own_netns():
        store = NodeStore("10.70.0.0/16")
        store.add(ME, "172.18.0.2")
        store.add("other", "172.18.0.3")
        server = serve(store)
        server.blackhole = True  # every watch: accepted, then silence
        try:
            effects_ = Recorder()
            agent = controller.NodeController(model.Settings(node_name=ME, cluster_cidrs=CLUSTER), effects_)
            thread = feed(kube.api_client(kubeconfig(tmp_path / "kubeconfig", server)), agent, stop, 2)
            wait_for(lambda: any(p.startswith("/api/v1/nodes?") and "watch" in p for p, _ in server.requests),
                     10, "the first watch")
            store.add("late", "172.18.0.4")  # only a relist can show it: the watch says nothing
            late = ("10.70.2.0/24", "172.18.0.4")
            wait_for(lambda: late in routes_of(effects_), 15, "the late node routed")
            assert thread.is_alive()
        finally:
            stop.set()
            server.close()
        thread.join(10)
    watches = [p for p, code in server.requests if code == 0]
    assert len(watches) >= 2  # the silent watch was given up and a new one started


def test_an_error_event_without_message_or_code_is_a_relist() -> None:
    listed = load("nodes.json")
    pool = FakePool([listed, listed], [[{"type": "ERROR", "object": {"kind": "Status"}}], []])
    reported: list[Exception] = []
    events = kube.node_events(api_client(pool), timeout_seconds=5, backoff=lambda _s: None,
                              report=reported.append)
    assert [next(events)[0], next(events)[0]] == ["SYNC", "SYNC"]
    assert len(reported) == 1 and getattr(reported[0], "status", None) == 0


def test_a_garbage_watch_line_is_a_relist() -> None:
    listed = load("nodes.json")
    pool = FakePool([listed, listed], [[["not", "an", "event"]], []])  # type: ignore[list-item]
    events = kube.node_events(api_client(pool), timeout_seconds=5, backoff=lambda _s: None)
    assert [next(events)[0], next(events)[0]] == ["SYNC", "SYNC"]


def broken_node() -> dict[str, Any]:
    """A Node the client's models refuse (an address without its required type) and the agent
    cannot route (a podCIDR that is no network)."""
    node = node_object("broken", "172.18.0.9", ["10.70.9.0/24"])
    node["status"]["addresses"] = [{"address": "172.18.0.9"}]
    node["spec"]["podCIDRs"] = ["10.70.9.0/33"]
    return node


def test_a_malformed_node_in_a_list_is_skipped_counted_and_the_others_apply(tmp_path: Path) -> None:
    listed = load("nodes.json")
    listed["items"].append(broken_node())
    listed["items"].append({"kind": "Node", "metadata": {}})  # no name at all
    metrics = NodeMetrics(registry := CollectorRegistry(), str(tmp_path / "conflist"))
    effects_ = Recorder()
    agent = controller.NodeController(model.Settings(node_name=ME, cluster_cidrs=CLUSTER), effects_, metrics)
    events = kube.node_events(api_client(FakePool([listed], [[]])), timeout_seconds=5,
                              backoff=lambda _s: None)
    kind, items = next(events)
    assert kind == "SYNC"
    agent.handle(kind, items)
    assert routes_of(effects_) == {("10.70.0.0/24", "172.18.0.4"), ("10.70.2.0/24", "172.18.0.3")}
    assert "broken" in agent.nodes and agent.nodes["broken"].pod_cidrs == ()
    malformed = {"kind": "Node", "reason": "malformed"}
    assert registry.get_sample_value("pybridge_node_refused_total", malformed) == 2


def test_a_malformed_pod_in_a_list_does_not_block_the_others() -> None:
    from .test_netpol_watch import PATHS, listing, pod

    nameless = pod("x", "nameless", "10.244.1.9")
    nameless["spec"]["containers"][0].pop("name")  # required by the client's V1Container
    pods = FakePool([listing([pod("x", "a", "10.244.1.5"), nameless], "11")], [[]])
    api = api_client(pods)
    pods.path = PATHS["Pod"]
    lister = netpol.listers(api)["Pod"]
    kind, items = next(kube.list_watch(api, lister, timeout_seconds=5, backoff=lambda _s: None))
    refused: list[Refusal] = []

    class Seen:
        def field_refused(self, refusal: Refusal) -> None:
            refused.append(refusal)

        def policies_refused(self, reasons: Mapping[str, int]) -> None:
            pass

        def applied(self, delays: Sequence[float], rules: int, elements: int) -> None:
            pass

        def apply_failed(self) -> None:
            pass

    agent = netpol.PolicyController(ME, lambda _s: None, lambda *_a, **_k: None, Seen())
    agent.handle("Pod", kind, items)
    assert ("x", "a") in agent.objects["Pod"]
    broken = {**pod("x", "broken", "10.244.1.8"), "spec": "not an object"}
    agent.handle("Pod", "ADDED", broken)
    assert ("x", "broken") not in agent.objects["Pod"] and refused[-1].kind == "Pod"


class Gone(FakePool):
    """Every list answers, every watch is 410 Gone at once: the compaction storm."""

    def __init__(self) -> None:
        super().__init__([], [])
        self.listed = 0

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.HTTPResponse:
        if "watch=" in url:
            self.watches = [410]
        else:
            self.listed += 1
            self.lists = [load("nodes.json")]
        return super().request(method, url, **kwargs)


def test_repeated_410_relists_are_spaced_by_a_backoff() -> None:
    pool = Gone()
    stop = threading.Event()

    def run() -> None:
        for _event in kube.node_events(api_client(pool), timeout_seconds=5, stop=stop.is_set):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(3.0)
    stop.set()
    thread.join(10)
    # backoff 0.25-0.5, then 0.5-1, 1-2, 2-4 s: at most 4 lists in 3 s (without it: thousands)
    assert 2 <= pool.listed <= 5, pool.listed


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    high, low = loop.Backoff(first=1, cap=8, rand=lambda: 1.0), loop.Backoff(first=1, cap=8, rand=lambda: 0.0)
    assert [high.next() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert [low.next() for _ in range(4)] == [0.5, 1, 2, 4]
    high.reset()
    assert high.next() == 1


@needs_root
def test_a_hung_nft_fails_its_reconcile_and_a_retry_applies_once_nft_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = nft.binary()
    hang = tmp_path / "hang"
    hang.touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nft").write_text(f"#!/bin/sh\nif [ -e {hang} ]; then exec sleep 60; fi\nexec {real} \"$@\"\n")
    (bin_dir / "nft").chmod(0o755)
    monkeypatch.setattr(nft, "binary", lambda: str(bin_dir / "nft"))  # (PATH lookups are cached)
    monkeypatch.setattr(nft, "TIMEOUT", 1.0)
    with own_netns() as netns:
        sh("ip", "-n", netns, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
        sh("ip", "-n", netns, "addr", "add", "172.18.0.2/24", "dev", "up0")
        sh("ip", "-n", netns, "link", "set", "up0", "up")
        sh("ip", "-n", netns, "link", "set", "up1", "up")
        host = effects.NodeEffects(str(tmp_path / "net.d"))
        agent = controller.NodeController(model.Settings(node_name=ME, cluster_cidrs=CLUSTER), host)
        items = load("nodes.json")["items"]
        started = time.monotonic()
        plan = agent.handle("SYNC", items)  # must come back (an error), not raise or hang
        assert time.monotonic() - started < 10
        assert agent.failed and plan.waiting is None
        conflist = tmp_path / "net.d" / model.CONFLIST_NAME
        assert not conflist.exists()  # no conflist before masquerade holds
        events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        stop = threading.Event()
        thread = threading.Thread(target=controller.serve, args=(agent, events, stop), daemon=True)
        thread.start()
        try:
            events.put(("Node", "MODIFIED", items[0]))  # fails again: nft still hangs
            time.sleep(1.5)
            assert thread.is_alive() and agent.failed
            hang.unlink()  # nft works again: a retry applies without any further event
            wait_for(conflist.exists, 90, "the conflist after nft recovered")
            assert not agent.failed
            tables = subprocess.run([real, "list", "tables"], capture_output=True, text=True, check=True)
            assert "pybridge_node" in tables.stdout, netns
        finally:
            stop.set()
            thread.join(10)
            hang.unlink(missing_ok=True)
    assert not thread.is_alive()


def test_a_failed_ruleset_is_retried_without_a_new_event_and_measured(tmp_path: Path) -> None:
    from .test_netpol_watch import pod, policy

    attempts: list[str] = []

    def apply_script(script: str) -> None:
        attempts.append(script)
        if len(attempts) < 3:
            raise NftError("nft did not finish within 30 s")

    stop = threading.Event()
    events = netpol.Arrivals()
    registry = CollectorRegistry()
    agent = netpol.PolicyController(ME, apply_script, lambda *_a, **_k: None,
                                    NodeMetrics(registry, str(tmp_path)))
    events.put(("Namespace", "SYNC", []))
    events.put(("ClusterNetworkPolicy", "SYNC", []))
    events.put(("NetworkPolicy", "SYNC", [policy("x", "deny", {"podSelector": {}})]))
    events.put(("Pod", "SYNC", [pod("x", "a", "10.244.1.5")]))
    started = time.monotonic()
    thread = threading.Thread(target=netpol.serve, args=(agent, events, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent.applied is not None, 20, "the ruleset applied after two failures")
    finally:
        stop.set()
        thread.join(10)
    took = time.monotonic() - started
    assert len(attempts) == 3 and not agent.failed
    value = registry.get_sample_value
    assert value("pybridge_policy_apply_failures_total") == 2
    assert value("pybridge_policy_applies_total") == 1
    # each of the four events waited through both backoffs (0.5-1 s, then 1-2 s)
    assert value("pybridge_policy_implementation_delay_seconds_count") == 4
    assert 4 * 1.5 <= (value("pybridge_policy_implementation_delay_seconds_sum") or 0) <= 4 * took
    assert value("pybridge_policy_implementation_delay_seconds_bucket", {"le": "1.0"}) == 0
    assert value("pybridge_policy_set_elements") == 1  # 10.244.1.5 in the ingress map
    # inet: 4 in each base chain (forward_ingress, forward_egress, input_egress), the pod's chain
    # jumps the policy's (empty) and drops; bridge: 4 in each base chain
    assert value("pybridge_policy_rules") == 4 + 4 + 4 + 2 + 4 + 4


def test_in_cluster_without_a_service_account_is_an_error_never_the_environments_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "https://192.0.2.1:6443"}}],
        "users": [{"name": "t", "user": {"token": "found-lying-around"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kube.ConfigError, match="service account"):
        kube.api_client()
    explicit = kube.api_client(str(config))  # outside a cluster: only when asked for
    assert explicit.configuration.host == "https://192.0.2.1:6443"
    assert explicit.configuration.socket_options == kube.KEEPALIVE


@needs_root
def test_readyz_is_not_ready_while_bridged_traffic_escapes_policy(tmp_path: Path) -> None:
    from .test_netpol_watch import fake_api

    logs: list[str] = []
    api = fake_api(expire=False)
    for pool in api.pools.values():
        pool.on_exhausted = lambda: time.sleep(0.2)
    with contextlib.ExitStack() as stack:
        stack.enter_context(own_netns())  # the rules it applies land in the test's netns
        refused = ["net/bridge/bridge-nf-call-iptables: Read-only file system"]
        checked: list[int] = []  # at launch, then after each ruleset applied

        def enable() -> list[str]:
            checked.append(1)
            return refused

        enforcement = netpol.launch(ME, api_client(api), 5,  # type: ignore[arg-type]
                                    lambda event, **_f: logs.append(event), enable=enable)
        stack.callback(time.sleep, 1.0)  # its threads see the stop before the netns goes
        stack.callback(enforcement.stop.set)
        conflist = tmp_path / model.CONFLIST_NAME
        conflist.write_text("{}")
        metrics = NodeMetrics(CollectorRegistry(), str(conflist))
        metrics.checks = checks = endpoint.Readiness()  # as node_metrics.start and the cli make it
        stack.callback(checks.close)
        checks.add("node controller", metrics.readiness)
        checks.add("NetworkPolicy", enforcement.readiness)
        metrics.reconciled(1, 0, 0, full_sync=True)
        wait_for(lambda: "bridge-nf-call-iptables" in (checks.reason() or ""), 10, "not ready for bridge-nf")
        assert "netpol-warning" in logs
        # the first ruleset's own check done (it comes after the heap is settled), then
        wait_for(lambda: len(checked) >= 2, 10, "the check after the first ruleset")
        enforcement.check_bridge(lambda *_a, **_k: None, lambda: [])  # br_netfilter loaded since
        checks.refresh()
        wait_for(lambda: checks.reason() is None, 10, "ready once br_netfilter is on")
