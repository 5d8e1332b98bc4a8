"""Pod start-up as the user sees it: CRI RunPodSandbox (what kubelet calls) on a private
containerd node, the containerd tier's own harness (testbed/node.py). The reference bridge +
host-local and pybridge with its agent get the same conflist shape (plugin, then portmap) and
each its own bridge, subnet and store, on one node in one run. The pods are timed in blocks, the
variants' blocks alternating (each in turn first), as the machine's speed drifts over minutes;
containerd restarts between blocks so it reads the next conflist, and one untimed pod warms
each block. Each runtime the containerd tier runs (Debian 12's 1.6, 2.x from Debian's unstable
archive) gets its own node and table. `PYTHONPATH=. python bench/cri.py [PODS]` times CRI alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed import containerd2
from testbed.node import (
    NETWORK,
    REFERENCE_PLUGINS,
    Node,
    Runtime,
    debian_runtime,
    missing_tools,
    sandbox_config,
    sid_runtime,
    wait_for,
)

VARIANTS = {  # label -> (plugin, ipam, bridge, subnet)
    "reference": ("bridge", "host-local", "pbt-bref0", "10.87.0.0/22"),
    "pybridge+agent": ("pybridge", "pyipam", "pbt-bpy0", "10.88.0.0/22"),
    # no agent on the node's socket: the launchers serve each call in a fresh interpreter
    "pybridge, no agent": ("pybridge", "pyipam", "pbt-bpn0", "10.89.0.0/22"),
}


def _conflist(node: Node, plugin: str, ipam: str, bridge: str, subnet: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {"type": plugin, "bridge": bridge, "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
             "ipam": {"type": ipam, "dataDir": str(node.root / f"ipam-{plugin}"),
                      "ranges": [[{"subnet": subnet}]]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


# The runtime's own floor: a conflist of the reference loopback alone, no pod network. Where the
# runtime refuses a sandbox without an interface of its own (CRI wants eth0's address), the floor
# is a host-network sandbox instead (no netns, no CNI call), and its label says so.
FLOOR = "floor: loopback only"
FLOOR_HOST = "floor: host network (loopback only refused)"


def _floor_conflist() -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{"type": "loopback"}]}


def _time_floor(node: Node, block: int, count: int, refused: list[str]) -> tuple[str, list[float]]:
    """The floor's pods: loopback only, or host-network ones once the runtime refused that."""
    if not refused:
        _use(node, _floor_conflist())
        try:
            return FLOOR, _time_pods(node, f"floor-{block}", count)
        except Exception as exc:  # the CRI error, said on stderr
            refused.append(str(exc).splitlines()[0][:300])
            for pod in node.cri.list_pods():
                node.cri.stop_pod(pod["id"])
                node.cri.remove_pod(pod["id"])
    return FLOOR_HOST, _time_pods(node, f"floorhost-{block}", count, host_network=True)


def _use(node: Node, conflist: dict[str, Any]) -> None:
    node.stop_containerd()
    (node.root / "net.d" / "10-pbt-e2e.conflist").write_text(json.dumps(conflist))
    node.start_containerd()
    wait_for(lambda: node.cri.conditions().get("NetworkReady"), 20, "CRI NetworkReady")


def _start_agent(node: Node) -> subprocess.Popen[bytes]:
    """In the node's netns, on the socket containerd's environment names (node.env)."""
    socket = Path(node.env["PYBRIDGE_AGENT_SOCKET"])
    client = node.root / "bin" / "pybridge"
    argv = ["nsenter", f"--net=/run/netns/{node.netns}", str(client), "agent", str(socket)]
    agent = subprocess.Popen(argv, stderr=subprocess.DEVNULL, env=node.env)
    wait_for(socket.exists, 30, "the agent's socket")
    return agent


def _time_pods(node: Node, label: str, pods: int, host_network: bool = False) -> list[float]:
    node.cri.run_pod(sandbox_config(f"warm-{label}", node.cgroup_parent, host_network=host_network))
    times = []
    for i in range(pods):
        config = sandbox_config(f"bench-{label}-{i}", node.cgroup_parent, host_network=host_network)
        started = time.perf_counter()
        node.cri.run_pod(config)
        times.append((time.perf_counter() - started) * 1000)
    for pod in node.cri.list_pods():
        node.cri.stop_pod(pod["id"])
        node.cri.remove_pod(pod["id"])
    return times


BLOCKS = 3


def runtimes() -> dict[str, Runtime | str]:
    """runtime id -> the runtime, or why it cannot be timed here."""
    if missing := missing_tools():
        return {"containerd": f"needs {', '.join(missing)}"}
    found: dict[str, Runtime | str] = {(debian := debian_runtime()).id: debian}
    try:
        two = sid_runtime()
        found[two.id] = two
    except containerd2.Unavailable as exc:
        found["containerd-2"] = f"containerd 2.x unavailable: {exc}"
    return found


def run_pod_sandbox(root: Path, pods: int, runtime: Runtime) -> dict[str, list[float]]:
    """RunPodSandbox milliseconds per variant on one runtime."""
    node = Node(root=root, runtime=runtime)
    times: dict[str, list[float]] = {}
    refused: list[str] = []
    try:
        node.setup()
        for name in ("bridge", "host-local"):
            (node.root / "bin" / name).symlink_to(REFERENCE_PLUGINS / name)
        order: list[tuple[str, tuple[str, str, str, str] | None]] = [*VARIANTS.items(), (FLOOR, None)]
        for block in range(BLOCKS):
            for label, variant in order if block % 2 == 0 else order[::-1]:
                count = pods // BLOCKS + (1 if block < pods % BLOCKS else 0)
                if variant is None:
                    floor, timed = _time_floor(node, block, count, refused)
                    times.setdefault(floor, []).extend(timed)
                    continue
                plugin, ipam, bridge, subnet = variant
                _use(node, _conflist(node, plugin, ipam, bridge, subnet))
                agent = _start_agent(node) if label.endswith("+agent") else None
                try:
                    times.setdefault(label, []).extend(_time_pods(node, f"{label}-{block}", count))
                finally:
                    if agent is not None:
                        agent.terminate()
                        agent.wait(30)
    finally:
        node.teardown()
    if refused:
        print(f"bench: {runtime.id}: the floor is host-network pods: loopback only refused: {refused[0]}",
              file=sys.stderr)
    return times


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    for name, found in runtimes().items():
        if isinstance(found, str):
            print(f"{name}: not measured ({found})")
            continue
        with tempfile.TemporaryDirectory(prefix="pbt-bench-cri-") as tmpdir:
            measured = run_pod_sandbox(Path(tmpdir), count, found)
        medians = {label: sorted(t)[len(t) // 2] for label, t in measured.items()}
        ref = medians["reference"]
        print(f"{name}: RunPodSandbox p50 ms, {count} pods per variant: "
              + ", ".join(f"{label} {ms:.1f} ({ms / ref:.2f}x)" for label, ms in medians.items()))
