#!/usr/bin/env python3
"""ADD latency of the frozen bundle vs the venv install (root; `make bundle` first).

    sudo .venv/bin/python scripts/measure-bundle.py [--pods 30]

In one throw-away host netns (pbt-measure-*), for each entry: N sequential ADDs (each into its
own pod netns), timed around the exec from a driver running inside the host netns (so
`ip netns exec` is not in the figures), then DEL of all. Entries: the venv's Python launcher
(what `make install` puts behind the compiled client) and the bundle, each served in-process
(no agent) and forwarded to a resident agent started from the same install.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cni_env(verb: str, i: int, pod: str, binary: str, socket: str) -> dict[str, str]:
    return {"CNI_COMMAND": verb, "CNI_CONTAINERID": f"m{i}", "CNI_NETNS": f"/run/netns/{pod}",
            "CNI_IFNAME": "eth0", "CNI_PATH": os.path.dirname(binary),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYBRIDGE_AGENT_SOCKET": socket}


def inner(args: argparse.Namespace) -> None:
    entries = json.loads(args.entries)
    pods = args.pod_names.split(",")
    results = {}
    for label, binary, agent_argv in entries:
        data_dir = tempfile.mkdtemp(prefix="pbt-measure-")
        sock = os.path.join(data_dir, "agent.sock")
        agent = None
        if agent_argv:
            agent = subprocess.Popen([*agent_argv, sock], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            while not os.path.exists(sock):
                time.sleep(0.02)
        conf = json.dumps({"cniVersion": "1.1.0", "name": "measure", "type": "pybridge",
                           "bridge": "br-measure", "isGateway": True,
                           "ipam": {"type": "pyipam", "dataDir": data_dir,
                                    "ranges": [[{"subnet": "10.91.0.0/16"}]]}}).encode()
        no_agent = os.path.join(data_dir, "none.sock")
        times = []
        for i, pod in enumerate(pods):
            start = time.perf_counter()
            proc = subprocess.run([binary], input=conf, capture_output=True, check=False,
                                  env=cni_env("ADD", i, pod, binary, sock if agent else no_agent))
            times.append((time.perf_counter() - start) * 1000)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        for i, pod in enumerate(pods):
            subprocess.run([binary], input=conf, capture_output=True, check=True,
                           env=cni_env("DEL", i, pod, binary, no_agent))
        if agent:
            agent.terminate()
            agent.wait(timeout=30)
        times.sort()
        results[label] = {"p50": round(statistics.median(times), 1),
                          "p90": round(times[int(len(times) * 0.9) - 1], 1),
                          "mean": round(statistics.mean(times), 1)}
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=30)
    parser.add_argument("--inner", action="store_true")
    parser.add_argument("--entries")
    parser.add_argument("--pod-names")
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    sys.path.insert(0, str(REPO))
    from cni_plugin.install import write_launchers

    bundle = REPO / "dist" / "pybridge" / "pybridge"
    assert bundle.exists(), "run `make bundle` first"
    tag = secrets.token_hex(3)
    host = f"pbt-measure-{tag}"
    pods = [f"pbt-measure-{tag}-{i}" for i in range(args.pods)]
    with tempfile.TemporaryDirectory() as tmp:
        launchers = write_launchers(os.path.join(tmp, "bin"))
        venv = launchers[0]
        entries = [
            ("venv launcher, in-process", venv, None),
            ("bundle, in-process", str(bundle), None),
            ("venv launcher -> agent", venv, [venv, "agent"]),
            ("bundle -> bundle agent", str(bundle), [str(bundle), "agent"]),
        ]
        try:
            for ns in (host, *pods):
                subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", host, "link", "set", "lo", "up"], check=True)
            out = subprocess.run(["ip", "netns", "exec", host, sys.executable, __file__, "--inner",
                                  "--entries", json.dumps(entries), "--pod-names", ",".join(pods)],
                                 check=True, capture_output=True, text=True).stdout
        finally:
            for ns in (*pods, host):
                subprocess.run(["ip", "netns", "del", ns], check=False)
    results = json.loads(out)
    print(f"ADD latency, {args.pods} sequential pods per entry, ms (p50 / p90 / mean):")
    for label, r in results.items():
        print(f"  {label:28} {r['p50']:7.1f} {r['p90']:7.1f} {r['mean']:7.1f}")


if __name__ == "__main__":
    main()
