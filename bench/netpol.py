"""NetworkPolicy figures of the node agent (root; docs/networkpolicy.md): not a timed test.

- full sync: 200 pods (all on this node, the worst case: every one gets rules) in 10
  namespaces and 100 policies of the shapes users write (pod and namespace selectors, both in
  one peer, ipBlock with except, numbered, ranged and named ports, ingress and egress), from
  the API objects to the table applied by `nft -f` in a throw-away netns;
- event -> rules: one event of each kind through the agent's queue and thread to the applied
  table, in the same world;
- RSS: this process after importing what the agent imports and holding that world.
Prints JSON.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import resource
import secrets
import statistics
import subprocess
import threading
import time
from typing import Any

import kubernetes  # noqa: F401  # the agent's import, counted in its RSS

from cni_plugin.node.netpol import apply, nft
from cni_plugin.node.netpol.agent import NetpolAgent, serve

NODE = "bench-node"
NAMESPACES = [f"ns{i}" for i in range(10)]


def pod(i: int) -> dict[str, Any]:
    return {"metadata": {"name": f"p{i}", "namespace": NAMESPACES[i % 10],
                         "labels": {"app": f"app{i % 20}", "tier": ("web", "api", "db")[i % 3]}},
            "spec": {"nodeName": NODE, "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": f"10.244.{i // 250}.{i % 250 + 2}"},
                                                      {"ip": f"fd00:244::{i + 2:x}"}]}}


def policy(i: int) -> dict[str, Any]:
    shapes: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {"app": f"app{i % 20}"}},
         "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                      "ports": [{"port": 8080}]}]},
        {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]},
         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{i % 5}"}},
                                "podSelector": {"matchLabels": {"tier": "api"}}}],
                      "ports": [{"port": "http"}]}]},
        {"podSelector": {"matchLabels": {"tier": "api"}}, "policyTypes": ["Egress"],
         "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{i}.0.0/16"]}}],
                     "ports": [{"port": 5000, "endPort": 5100}, {"protocol": "UDP", "port": 53}]}]},
        {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]},
    ]
    return {"metadata": {"name": f"np{i}", "namespace": NAMESPACES[i % 10]}, "spec": shapes[i % 4]}


def namespace(i: int, team: int) -> dict[str, Any]:
    return {"metadata": {"name": NAMESPACES[i], "labels": {"team": f"t{team}"}}}


def main() -> None:
    netns = f"pbt-h17bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    nft_cmd = ["ip", "netns", "exec", netns, "nft"]
    try:
        pods = [pod(i) for i in range(200)]
        policies = [policy(i) for i in range(100)]
        namespaces = [namespace(i, i % 5) for i in range(10)]
        syncs, computes = [], []
        for _ in range(5):
            agent = NetpolAgent(NODE, lambda s: apply.replace(s, nft_cmd), lambda *_a, **_k: None)
            started = time.perf_counter()
            agent.handle("NetworkPolicy", "SYNC", policies)
            agent.handle("Pod", "SYNC", pods)
            agent.handle("Namespace", "SYNC", namespaces)
            script = agent.ruleset()
            computed = time.perf_counter()
            apply.replace(script, nft_cmd)
            syncs.append(time.perf_counter() - started)
            computes.append(computed - started)
        rules = subprocess.run([*nft_cmd, "list", "table", "inet", nft.TABLE], capture_output=True,
                               text=True, check=True).stdout

        events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        done: queue.Queue[float] = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=serve,
                                  args=(agent, events, stop, lambda: done.put(time.monotonic())))
        worker.start()
        relabelled = {**pods[0], "metadata": {**pods[0]["metadata"], "labels": {"app": "other"}}}
        changed = {**policies[0], "spec": {**policies[0]["spec"], "ingress": [{}]}}
        steps = [("Pod", "ADDED", pod(200)), ("Pod", "MODIFIED", relabelled),
                  ("Pod", "DELETED", pod(200)),
                  ("Namespace", "MODIFIED", namespace(0, 4)), ("NetworkPolicy", "ADDED", policy(100)),
                  ("NetworkPolicy", "MODIFIED", changed), ("NetworkPolicy", "DELETED", policy(100))]
        latencies: dict[str, float] = {}
        for kind, event, obj in steps:
            sent = time.monotonic()
            events.put((kind, event, obj))
            latencies[f"{kind} {event}"] = round((done.get(timeout=10) - sent) * 1000, 1)
        stop.set()
        worker.join()
        print(json.dumps({
            "machine": f"{os.cpu_count()} CPU, kernel {platform.release()}, "
                       f"Python {platform.python_version()}",
            "pods": len(pods), "policies": len(policies),
            "full_sync_ms": {"median": round(statistics.median(syncs) * 1000, 1),
                             "max": round(max(syncs) * 1000, 1)},
            "compute_ms_median": round(statistics.median(computes) * 1000, 1),
            "event_to_rules_ms": latencies,
            "ruleset_lines": len(rules.splitlines()),
            "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }, indent=2))
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    main()
