"""The node controller's NetworkPolicy watches through the real Kubernetes client against FakeApi:
list + watch of NetworkPolicy, Pod and Namespace (resourceVersion, relist on 410 Gone), the
objects as the client deserializes and serializes them, and the agent thread applying rules.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cni_plugin.node import kube, loop
from cni_plugin.node.netpol import policy_controller as netpol
from cni_plugin.node.netpol.nft import stable_names
from cni_plugin.node.netpol.policy_controller import PolicyController

from .apiserver import FakeApi, FakePool, api_client

ME = "pybridge-worker"
PATHS = {"NetworkPolicy": "/apis/networking.k8s.io/v1/networkpolicies", "Pod": "/api/v1/pods",
         "Namespace": "/api/v1/namespaces",
         "ClusterNetworkPolicy": "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"}


SERVE_8080 = {"name": "serve-80-tcp", "containerPort": 8080}


def pod(ns: str, name: str, ip: str, node: str = ME, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name, **labels}},
            "spec": {"nodeName": node,
                     "containers": [{"name": "c", "image": "agnhost", "ports": [SERVE_8080]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def policy(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def admin_deny(name: str) -> dict[str, Any]:
    """An Admin ClusterNetworkPolicy: nothing from namespace y into x."""
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": "Admin", "priority": 10,
                     "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
                     "ingress": [{"action": "Deny",
                                  "from": [{"namespaces": {"matchLabels": {"team": "y"}}}]}]}}


def listing(items: list[dict[str, Any]], version: str) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": version}, "items": items}


NAMED_PORT_FROM_Y = {"podSelector": {"matchLabels": {"pod": "a"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}],
                                  "ports": [{"port": "serve-80-tcp"}]}]}


def fake_api(expire: bool, crd: bool = False) -> FakeApi:
    """x/a here, y/b on another node; a policy on x/a admits namespaces labelled team=y on its
    named port; the watches then relabel y and add a deny-all policy (`expire`: after a 410 and
    a relist that no longer has the first policy); an Admin ClusterNetworkPolicy is listed (and
    with `expire` its watch is lost: 410, relisted without it), or with no `crd` that collection
    is not served (404)."""
    pods = [pod("x", "a", "10.244.1.5"), pod("y", "b", "10.244.2.7", node="other")]
    lists = [listing([policy("x", "allow-y", NAMED_PORT_FROM_Y)], "10")]
    lists += [listing([], "40")] if expire else []
    added: list[dict[str, Any]] = [{"type": "ADDED", "object": policy("x", "deny-all", {"podSelector": {}})}]
    cnps: list[dict[str, Any] | int] = [listing([admin_deny("deny-y")], "13")] if crd else [404]
    cnps += [listing([], "41")] if crd and expire else []
    return FakeApi({
        PATHS["NetworkPolicy"]: FakePool(lists, [410, added] if expire else [added]),
        PATHS["Pod"]: FakePool([listing(pods, "11")], [[{"type": "MODIFIED", "object": pods[0]}]]),
        PATHS["Namespace"]: FakePool(
            [listing([namespace("x"), namespace("y")], "12")],
            [[{"type": "MODIFIED", "object": namespace("y", team="y")}]]),
        PATHS["ClusterNetworkPolicy"]: FakePool(cnps, [410] if crd and expire else []),
    })


class Exhausted(Exception):
    pass


def drain(api: Any, client: Any) -> Iterator[tuple[str, str, Any]]:
    """Each kind's events through kube.list_watch until its fake pool has served all it has
    (list_watch never raises: the pool's end stops it through its stop flag)."""
    for kind, lister in netpol.listers(client).items():
        done = threading.Event()

        def exhausted(done: threading.Event = done) -> None:
            done.set()
            raise Exhausted
        api.pools[PATHS[kind]].on_exhausted = exhausted
        for event, obj in kube.list_watch(client, lister, timeout_seconds=7, backoff=lambda _s: None,
                                          stop=done.is_set):
            yield kind, event, obj
        assert done.is_set()


def test_each_kind_is_listed_then_watched_from_its_resource_version() -> None:
    api = fake_api(expire=True, crd=True)
    client = api_client(api)  # type: ignore[arg-type]
    seen: dict[str, list[tuple[str, Any]]] = {}
    for kind, event, obj in drain(api, client):
        seen.setdefault(kind, []).append((event, obj))
    names = {k: [(e, [o["metadata"]["name"] for o in obj] if e == "SYNC" else obj["metadata"]["name"])
                 for e, obj in v] for k, v in seen.items()}
    assert names == {
        "NetworkPolicy": [("SYNC", ["allow-y"]), ("SYNC", []), ("ADDED", "deny-all")],  # 410: listed again
        "Pod": [("SYNC", ["a", "b"]), ("MODIFIED", "a")],
        "Namespace": [("SYNC", ["x", "y"]), ("MODIFIED", "y")],
        "ClusterNetworkPolicy": [("SYNC", ["deny-y"]), ("SYNC", [])],  # 410: listed again
    }
    watches = [q for q in api.pools[PATHS["NetworkPolicy"]].requests if q.get("watch")]
    assert [q["resourceVersion"] for q in watches] == [["10"], ["40"]]
    assert all(q["timeoutSeconds"] == ["7"] for q in watches)
    # the client's models serialized back keep what the agent reads (camelCase fields, named ports)
    listed_pod = seen["Pod"][0][1][0]
    assert listed_pod["status"]["podIPs"] == [{"ip": "10.244.1.5"}] and listed_pod["spec"]["nodeName"] == ME
    assert listed_pod["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080


@pytest.mark.parametrize("crd", [False, True], ids=["no-cnp-crd", "admin-cnp"])
def test_agent_thread_follows_the_events(crd: bool) -> None:
    """Without the ClusterNetworkPolicy CRD its list answers 404, which is no objects; with it,
    the Admin policy listed judges x/a before its NetworkPolicies."""
    applied: list[str] = []  # the rulesets in force, one per apply (the later ones applied as changes)
    stop = threading.Event()
    logs: list[tuple[str, dict[str, Any]]] = []
    agent = PolicyController(ME, lambda _s: None, lambda event, **f: logs.append((event, f)))
    api = fake_api(expire=False, crd=crd)

    def hold() -> None:  # a script used up: this stream waits for the end of the test
        stop.wait(30)
        raise Exhausted

    for pool in api.pools.values():
        pool.on_exhausted = hold
    stream = netpol.kube_stream(api_client(api), 7, stop, lambda *_a, **_k: None)  # type: ignore[arg-type]
    threads = netpol.start(agent, stream, lambda *a, **k: None, (Exhausted,), stop,
                           on_applied=lambda: applied.append(agent.applied or ""))
    try:
        deadline = time.monotonic() + 20
        while not any("x/deny-all" in s and "10.244.2.7" in s for s in applied):
            assert time.monotonic() < deadline, f"deny-all never applied: {applied[-1:]!r}"
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    # nothing before all four kinds were listed: every ruleset has x/a and the first policies
    jump = "10.244.1.5 : jump ingress_a" if crd else "10.244.1.5 : jump ingress_"
    assert all(jump in s and "x/allow-y" in s and (not crd or '"deny-y"' in s) for s in applied)
    if crd:  # y/b a peer of the Admin Deny once y got its label, the NetworkPolicies after it
        c0 = stable_names("c", ["deny-y"])["deny-y"]
        assert f"\t\tjump {c0}_ingress\n\t\tgoto ingress_" in applied[-1]
        # (its peers are the NetworkPolicy's: one set, shared)
        chain = f'\tchain {c0}_ingress {{\n\t\tcomment "deny-y"\n\t\tip saddr @p'
        assert chain in applied[-1] and "_ingress0_peer4 drop\n" in applied[-1]
    # its named port resolved on x/a (8080); y/b a peer once y got its label; deny-all added
    final = applied[-1]
    assert "10.244.1.5 . tcp . 8080" in final and "10.244.2.7" in final and "x/deny-all" in final
    assert len(applied) == len(set(applied))  # an unchanged ruleset is not applied again
    assert logs and all(event == "netpol-applied" for event, _ in logs)


def test_flag_turns_enforcement_off_and_removes_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from cni_plugin.node import controller
    from cni_plugin.node.netpol import apply

    calls: list[str] = []
    monkeypatch.setattr(apply, "remove", lambda: calls.append("remove"))
    def launch(node: str, _api: object, resync: int, _log: object, **_kw: object) -> netpol.Enforcement:
        calls.append(f"launch {node} {resync}")
        return netpol.Enforcement(threading.Event(), [])

    monkeypatch.setattr(netpol, "launch", launch)
    args = controller.parser().parse_args(["run", "--node-name", ME, "--network-policy", "off"])
    controller._network_policy(args, api=None)
    assert calls == ["remove"]
    monkeypatch.setenv("NETWORK_POLICY", "off")
    assert controller.parser().parse_args(["run"]).network_policy == "off"
    monkeypatch.delenv("NETWORK_POLICY")
    args = controller.parser().parse_args(["run", "--node-name", ME, "--resync", "9"])
    controller._network_policy(args, api=None)
    assert calls == ["remove", f"launch {ME} 9"]  # on by default


def test_a_stream_error_is_logged_and_the_stream_starts_over() -> None:
    stop = threading.Event()
    events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    logs: list[tuple[str, dict[str, Any]]] = []
    attempts = []

    def stream(kind: str) -> Iterator[tuple[str, Any]]:
        attempts.append(kind)
        if len(attempts) == 1:
            raise OSError("connection refused")
        yield "SYNC", []
        stop.set()

    loop.pump("Pod", stream, events, lambda event, **f: logs.append((event, f)), stop, (OSError,))
    assert attempts == ["Pod", "Pod"]
    assert logs == [("retry", {"kind": "Pod", "error": "connection refused"})]
    assert events.get_nowait() == ("Pod", "SYNC", [])


def test_a_failing_batch_is_logged_and_the_next_event_applies() -> None:
    stop = threading.Event()
    events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    logs: list[str] = []
    scripts: list[str] = []

    def apply_script(script: str) -> None:
        if not scripts and "x/deny" not in script:
            scripts.append("refused")
            raise ValueError("unexpected")  # a bug, not an nft error: must not end the thread
        scripts.append(script)
        if "x/deny" in script:
            stop.set()

    agent = PolicyController(ME, apply_script, lambda event, **f: logs.append(event))
    for kind in ("NetworkPolicy", "Namespace", "ClusterNetworkPolicy"):
        events.put((kind, "SYNC", []))
    events.put(("Pod", "SYNC", [pod("x", "a", "10.244.1.5")]))
    thread = threading.Thread(target=netpol.serve, args=(agent, events, stop))
    thread.start()
    deadline = time.monotonic() + 10
    while not logs and time.monotonic() < deadline:
        time.sleep(0.01)
    events.put(("NetworkPolicy", "ADDED", policy("x", "deny", {"podSelector": {}})))
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert logs == ["netpol-error", "netpol-applied"] and scripts[0] == "refused"
    assert "x/deny" in scripts[-1]


def test_what_the_api_accepts_through_the_client_isolates() -> None:
    """An except with host bits and a cidr with leading zeros (values the API server accepts)
    and a pod address with a zone reach the agent through the client as served; the policy
    isolates x/a (it was dropped whole, x/a left open) and the zone never reaches nft."""
    sloppy = {"podSelector": {"matchLabels": {"pod": "a"}},
              "ingress": [{"from": [{"ipBlock": {"cidr": "010.244.0.0/16", "except": ["10.244.2.1/24"]}}]}]}
    scoped = pod("y", "c", "10.244.1.9")
    scoped["status"]["podIPs"].append({"ip": "fd00::9%x"})
    api = FakeApi({
        PATHS["NetworkPolicy"]: FakePool([listing([policy("x", "sloppy", sloppy)], "1")], []),
        PATHS["Pod"]: FakePool([listing([pod("x", "a", "10.244.1.5"), scoped], "2")], []),
        PATHS["Namespace"]: FakePool([listing([namespace("x"), namespace("y")], "3")], []),
        PATHS["ClusterNetworkPolicy"]: FakePool([404], []),  # no CRD: none, not an error
    })
    client = api_client(api)  # type: ignore[arg-type]
    applied: list[str] = []
    logs: list[tuple[str, dict[str, Any]]] = []
    agent = PolicyController(ME, applied.append, lambda event, **f: logs.append((event, f)))
    for kind, event, obj in drain(api, client):
        agent.handle(kind, event, obj)
    assert agent.reconcile()
    assert "10.244.1.5 : jump ingress_" in applied[-1] and "%" not in applied[-1]
    assert "elements = { 10.244.0.0/23, 10.244.3.0/24, 10.244.4.0/22, " in applied[-1]  # minus 10.244.2.0/24
    assert [(f["object"], f["field"]) for e, f in logs if e == "netpol-refused"] == [
        ("y/c", "status.podIPs.1.ip")]
