"""ADD latency through the agent while a pod floods its HTTP endpoint (issue 30, point 5).

A throw-away host netns runs the agent with /metrics (and /readyz beside it) on every address, as
the DaemonSet binds it to the node's; an "attacker" pod on the bridge floods that listener with
`--clients` connections back to back. Meanwhile a driver in the host netns times ADDs the way a
runtime makes them (fork+exec of the installed client). Scenarios run in alternating blocks
(idle, /metrics flood, /readyz flood) so drift hits all alike. Prints a JSON summary: ADD p50/p90
per scenario, the ratio to idle, and the requests the flood got answered. A figure to report,
not a pass/fail. Root; run it alone (flock /work/heavy.lock).

    .venv/bin/python bench/endpoint_flood.py [--blocks 4] [--adds 25] [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cni_plugin.install import install  # noqa: E402
from testbed.harness import Host, bridge_conf, new_netns  # noqa: E402

PORT = 19430
HEALTH_PORT = 19432
SCENARIOS = ("idle", "/metrics", "/readyz")
OUTCOMES = ("answered", "refused_or_timed_out")

FLOOD = textwrap.dedent("""
    import http.client, json, signal, sys, threading, time
    address, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    clients, seconds = int(sys.argv[4]), float(sys.argv[5])
    counts = {"answered": 0, "refused_or_timed_out": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    def loop():
        while time.monotonic() < deadline and not stop.is_set():
            conn = http.client.HTTPConnection(address, port, timeout=2)
            try:
                conn.request("GET", path)
                conn.getresponse().read()
                key = "answered"
            except OSError:
                key = "refused_or_timed_out"
            finally:
                conn.close()
            with lock:
                counts[key] += 1
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads: t.start()
    while any(t.is_alive() for t in threads):
        stop.wait(0.2)
    for t in threads: t.join()
    print(json.dumps(counts))
""")

TIMER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[6])
    from driver import call
    binary, conf, pods = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(",")
    tag, env = sys.argv[4], json.loads(sys.argv[5])
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}
    times = []
    for i, pod in enumerate(pods):
        ms, code, out = call(binary, "ADD", conf, f"{tag}-{i}", f"/run/netns/{pod}", env)
        assert code == 0, out
        times.append(ms)
    for i, pod in enumerate(pods):
        call(binary, "DEL", conf, f"{tag}-{i}", f"/run/netns/{pod}", env)
    print(json.dumps(times))
""")


def time_adds(host: Host, conf: dict[str, Any], pods: list[str], tag: str) -> list[float]:
    env = {"CNI_PATH": str(host.bin_dir), "PYBRIDGE_AGENT_SOCKET": str(host.agent_socket)}
    proc = host.exec(sys.executable, "-c", TIMER, str(host.bin_dir / "pybridge"), json.dumps(conf),
                     ",".join(pods), tag, json.dumps(env), str(REPO / "bench"), timeout=600)
    times: list[float] = json.loads(proc.stdout)
    return times


def block(host: Host, conf: dict[str, Any], pods: list[str], attacker: str, gateway: str, scenario: str,
          tag: str, clients: int) -> tuple[list[float], dict[str, int]]:
    if scenario == "idle":
        return time_adds(host, conf, pods, tag), {}
    # the flood is told to last an hour and stopped once the timed ADDs are done
    flood = subprocess.Popen(["ip", "netns", "exec", attacker, sys.executable, "-c", FLOOD, gateway,
                              str(PORT), scenario, str(clients), "3600"], stdout=subprocess.PIPE)
    try:
        subprocess.run(["sleep", "1"], check=True)  # the flood at full rate before the first ADD
        times = time_adds(host, conf, pods, tag)
    finally:
        flood.terminate()
        out, _ = flood.communicate(timeout=30)
    return times, json.loads(out) if out.strip() else {}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--adds", type=int, default=25, help="timed ADDs per block")
    parser.add_argument("--clients", type=int, default=16, help="flooding connections at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pbt-flood-") as tmp_dir:
        tmp = Path(tmp_dir)
        install(str(tmp / "bin"), str(tmp / "libexec"))
        host = Host(name=new_netns("host"), data_dir=tmp / "ipam", bin_dir=tmp / "bin",
                    agent_socket=tmp / "agent" / "agent.sock")
        try:
            host.exec("ip", "link", "set", "lo", "up")
            conf = bridge_conf(host)
            conf_dir = tmp / "conf"
            conf_dir.mkdir()
            (conf_dir / "10-test.conf").write_text(json.dumps(conf))
            host.start_agent(tmp / "agent.log", {"PYBRIDGE_METRICS_ADDRESS": f"0.0.0.0:{PORT}",
                                                  "PYBRIDGE_HEALTH_ADDRESS": f"127.0.0.1:{HEALTH_PORT}",
                                                  "PYBRIDGE_CONF_DIR": str(conf_dir)})
            attacker = host.new_pod()
            result = host.add(conf, attacker, container_id="attacker")
            gateway = next(ip["gateway"] for ip in result["ips"])
            pods = [host.new_pod() for _ in range(args.adds)]
            times: dict[str, list[float]] = {s: [] for s in SCENARIOS}
            floods: dict[str, list[dict[str, int]]] = {s: [] for s in SCENARIOS}
            for b in range(args.blocks):
                for scenario in SCENARIOS:
                    tag = f"b{b}{scenario.strip('/')}"
                    got, flood = block(host, conf, pods, attacker, gateway, scenario, tag, args.clients)
                    times[scenario] += got
                    floods[scenario].append(flood)
                    print(f"block {b} {scenario}: ADD p50 {statistics.median(got):.2f} ms {flood}",
                          file=sys.stderr, flush=True)
        finally:
            host.destroy()
    idle = statistics.median(times["idle"])
    summary = {
        scenario: {
            "adds": len(t), "add_p50_ms": round(statistics.median(t), 2), "add_p90_ms": round(pct(t, 0.9), 2),
            "p50_vs_idle": round(statistics.median(t) / idle, 3),
            "flood": {k: sum(f.get(k, 0) for f in floods[scenario]) for k in OUTCOMES},
        }
        for scenario, t in times.items()
    }
    print(json.dumps({"clients": args.clients, "blocks": args.blocks, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
