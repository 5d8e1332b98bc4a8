"""Helpers of the operator tests: a conf dir naming the test's network, and `pybridge ls`,
`doctor` and the agent's HTTP endpoint run inside the test's host netns."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from testbed.harness import Host, bridge_conf

METRICS_PORT = 19430  # inside the test's own netns: no clash with anything on the machine


def ops_conf(host: Host, **overrides: Any) -> dict[str, Any]:
    """The test network with masquerade; cniVersion 1.0.0, which the oldest runtime doctor knows
    (containerd 1.x) accepts, so a healthy node is all ok."""
    return bridge_conf(host, cniVersion="1.0.0", ipMasq=True, **overrides)


def agent_env(conf_dir: Path) -> dict[str, str]:
    return {"PYBRIDGE_CONF_DIR": str(conf_dir), "PYBRIDGE_METRICS_ADDRESS": f"127.0.0.1:{METRICS_PORT}"}


def write_conf(directory: Path, conf: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "10-test.conf"
    path.write_text(json.dumps(conf))
    return directory


def pybridge(host: Host, *args: str) -> tuple[int, str]:
    """`pybridge ARGS` in the host netns, told where the test's agent listens."""
    proc = host.exec("env", f"PYBRIDGE_AGENT_SOCKET={host.agent_socket}", sys.executable, "-m", "cni_plugin",
                     *args, check=False)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    return proc.returncode, proc.stdout.decode()


def ls(host: Host, conf_dir: Path, cache_dir: Path) -> dict[str, dict[str, Any]]:
    """`pybridge ls --json` keyed by container id (or host veth for unreserved ones)."""
    code, out = pybridge(host, "ls", "--json", "--conf-dir", str(conf_dir), "--cache-dir", str(cache_dir))
    assert code == 0, out
    return {row["container_id"] or row["host_veth"]: row for row in json.loads(out)}


def doctor(host: Host, conf_dir: Path, *extra: str) -> tuple[int, dict[str, dict[str, str]]]:
    code, out = pybridge(host, "doctor", "--json", "--conf-dir", str(conf_dir), "--bin-dir",
                         str(host.bin_dir), *extra)
    report = json.loads(out)
    assert report["ok"] == (code == 0)
    return code, {check["name"]: check for check in report["checks"]}


def http_get(host: Host, path: str, port: int = METRICS_PORT) -> tuple[bool, str]:
    """(2xx, body) of a GET to the agent's endpoint on the host netns' loopback."""
    proc = host.exec("busybox", "wget", "-q", "-O", "-", f"http://127.0.0.1:{port}{path}", check=False)
    return proc.returncode == 0, proc.stdout.decode()


GETS = """
import collections, json, sys, urllib.error, urllib.request
url, count = sys.argv[1], int(sys.argv[2])
statuses, body = collections.Counter(), ""
for _ in range(count):
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            statuses[reply.status] += 1
            body = reply.read().decode()
    except urllib.error.HTTPError as exc:
        statuses[exc.code] += 1
        body = exc.read().decode()
    except OSError:
        statuses[0] += 1
print(json.dumps([statuses, body]))
"""


def http_gets(host: Host, path: str, count: int = 1, port: int = METRICS_PORT) -> tuple[dict[int, int], str]:
    """({status: how many}, the last body) of `count` GETs in a row from the host netns (status
    0: no answer)."""
    proc = host.exec(sys.executable, "-c", GETS, f"http://127.0.0.1:{port}{path}", str(count))
    statuses, body = json.loads(proc.stdout)
    return {int(k): v for k, v in statuses.items()}, body


def restart_agent(host: Host, log: Path, env: dict[str, str]) -> None:
    """The fixture's agent again, started with `env` (conf dir, metrics address)."""
    host.stop_agent()
    host.start_agent(log, env)
