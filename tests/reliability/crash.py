"""kill -9 at random moments of ADD, then what a runtime does: DEL, or GC with the live pods.

No fault-injection hook: the kill moment is a random delay after the ADD was started, drawn
mostly from the window in which the plugin does its work (calibrated on this machine: an
exec'd in-process ADD spends most of its time starting the interpreter). Where the kill
landed is read back from what exists right after it (reservation, pod link, addresses,
masquerade rule), which gives the distribution of kill points.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_plugin import masq
from testbed.harness import REFERENCE_PLUGINS, Host, delete_netns

from .ledger import Pod, addresses_of, census, cni_retry, masq_comments, owners, pod_addresses

# What gets killed: the exec'd plugin serving in-process; the exec'd launcher while a resident
# agent serves its call; or the agent itself.
KILL_PLUGIN, KILL_CLIENT, KILL_AGENT = "plugin", "client", "agent"


def start(
    host: Host, command: str, conf: dict[str, Any], pod: str, container_id: str
) -> subprocess.Popen[bytes]:
    variables = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": f"/run/netns/{pod}",
        "CNI_IFNAME": "eth0", "CNI_PATH": f"{host.bin_dir}:{REFERENCE_PLUGINS}",
        "PYBRIDGE_AGENT_SOCKET": str(host.agent_socket),
    }
    proc = subprocess.Popen(
        ["ip", "netns", "exec", host.name, "env", "-i", f"PATH={os.environ['PATH']}",
         *(f"{k}={v}" for k, v in variables.items()), str(host.bin_dir / "pybridge")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(conf).encode())
    proc.stdin.close()
    proc.stdin = None  # communicate() must not flush it again
    return proc


def restart_agent(host: Host, log: Path) -> None:
    """As systemd would: a new agent on the same socket path (the dead one's file is stale)."""
    if host.agent is not None:
        host.agent.wait(timeout=30)
        host.agent = None
    host.agent_socket.unlink(missing_ok=True)
    host.start_agent(log)


def progress(host: Host, network: str, pod: Pod) -> str:
    """How far the killed ADD got, from what exists now."""
    held = [ip for ip, owner in owners(host, network).items() if owner == pod.key]
    link = host.pod_exec(pod.netns, "ip", "link", "show", pod.ifname, check=False).returncode == 0
    addrs = pod_addresses(host, pod)
    tag = masq.attachment_tag(network, *pod.key)
    if tag in masq_comments(host):
        return "5-masquerade"
    if addrs:
        return "4-pod-addressed"
    if link:
        return "3-veth"
    if held:
        return "2-ipam"
    return "1-nothing"


@dataclass
class Outcome:
    trials: int = 0
    kill_points: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    dels: int = 0
    del_errors: list[str] = field(default_factory=list)
    left_to_gc: int = 0
    leaks_after_del: Counter[str] = field(default_factory=Counter)
    census: dict[str, int] = field(default_factory=dict)
    delays_ms: list[float] = field(default_factory=list)


def calibrate(host: Host, conf: dict[str, Any], runs: int = 3) -> tuple[float, float]:
    """(seconds until the reservation appears, seconds for the whole ADD), medians."""
    network = conf["name"]
    firsts, totals = [], []
    for i in range(runs):
        pod = host.new_pod()
        cid = f"calib{i}"
        started = time.monotonic()
        proc = start(host, "ADD", conf, pod, cid)
        first = None
        while proc.poll() is None:
            if first is None and any(o[0] == cid for o in owners(host, network).values()):
                first = time.monotonic() - started
            time.sleep(0.002)
        totals.append(time.monotonic() - started)
        firsts.append(first if first is not None else totals[-1] * 0.7)
        assert proc.returncode == 0, proc.stdout.read() if proc.stdout else b""
        assert host.cni("DEL", conf, pod, cid).ok
        host.pods.remove(pod)
        delete_netns(pod)
    firsts.sort()
    totals.sort()
    return firsts[len(firsts) // 2], totals[len(totals) // 2]


def run_trials(host: Host, conf: dict[str, Any], what: str, trials: int, seed: int,
               logs: Path) -> Outcome:
    rng = random.Random(seed)
    network = conf["name"]
    first, total = calibrate(host, conf)
    out = Outcome()
    live: list[Pod] = []
    deleted: set[tuple[str, str]] = set()
    restarts = 0
    for i in range(trials):
        pod = Pod(netns=host.new_pod(), container_id=f"k{i:04d}")
        if what == KILL_PLUGIN and rng.random() < 0.8:
            delay = rng.uniform(max(0.0, first - 0.1 * total), total * 1.05)
        else:
            delay = rng.uniform(0, total * 1.1)
        out.delays_ms.append(round(delay * 1000, 1))
        proc = start(host, "ADD", conf, pod.netns, pod.container_id)
        time.sleep(delay)
        if what == KILL_AGENT:
            assert host.agent is not None
            host.agent.send_signal(signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=60)
        out.trials += 1
        if what == KILL_AGENT:
            restarts += 1
            restart_agent(host, logs / f"agent-restart-{restarts}.log")
        if proc.returncode == 0:
            out.kill_points["6-done"] += 1
            out.completed += 1
            pod.addresses = addresses_of(json.loads(stdout))
            live.append(pod)
            if rng.random() < 0.3:  # some pods are deleted later, as in life
                _delete(host, conf, pod, out, deleted)
                live.remove(pod)
                host.pods.remove(pod.netns)
                delete_netns(pod.netns)
            continue
        out.kill_points[progress(host, network, pod)] += 1
        if rng.random() < 0.8:
            _delete(host, conf, pod, out, deleted)
            # Right after the runtime's DEL, nothing of this attachment may be left.
            mine = [ip for ip, owner in owners(host, network).items() if owner == pod.key]
            out.leaks_after_del["addresses"] += len(mine)
            out.leaks_after_del["masq_rules"] += masq_comments(host).count(
                masq.attachment_tag(network, *pod.key))
            out.leaks_after_del["pod_links"] += int(bool(host.pod_exec(
                pod.netns, "ip", "link", "show", "eth0", check=False).returncode == 0))
        else:
            out.left_to_gc += 1  # the runtime lost track too: the sandbox goes, GC cleans up
        host.pods.remove(pod.netns)
        delete_netns(pod.netns)
    # An agent may still be finishing a call whose client was killed: give it a moment, then
    # count what belongs to attachments the runtime already deleted.
    time.sleep(1.0)
    late = owners(host, network)
    out.leaks_after_del["late_addresses"] = sum(1 for o in late.values() if o in deleted)
    comments = masq_comments(host)
    out.leaks_after_del["late_masq_rules"] = sum(comments.count(masq.attachment_tag(network, *k))
                                                 for k in deleted)
    valid = [{"containerID": p.container_id, "ifname": p.ifname} for p in live]
    gc = cni_retry(host, "GC", {**conf, "cni.dev/valid-attachments": valid})
    assert gc.ok, gc.stdout
    out.census = census(host, network, live)
    return out


def _delete(host: Host, conf: dict[str, Any], pod: Pod, out: Outcome, deleted: set[tuple[str, str]]) -> None:
    reply = cni_retry(host, "DEL", conf, pod.netns, pod.container_id)
    out.dels += 1
    deleted.add(pod.key)
    if not reply.ok:
        out.del_errors.append(reply.stdout.decode(errors="replace")[:200])
