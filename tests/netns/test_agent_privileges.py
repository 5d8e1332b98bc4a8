"""The agent with the DaemonSet's privileges and nothing more (deploy/pybridge.yaml): only the
capabilities its `agent` container adds, no new privileges, /proc/sys read-only as a runtime
mounts it in an unprivileged container, the host's /proc/sys/net where the manifest binds it and
PYBRIDGE_PROC_SYS says. The agent then serves ADD, CHECK and DEL itself (none declined to the
in-process fallback, which runs with all of root's privileges) and the pod's sysctls are
written. kind-sim runs the same through containerd and runc; this runs in the netns tier."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from testbed.harness import Host, bridge_conf

from .ops import METRICS_PORT, http_gets

pytestmark = pytest.mark.netns

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "pybridge.yaml"


def agent_container() -> dict[str, Any]:
    daemonset = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "DaemonSet")
    return next(c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")


def start_confined_agent(host: Host, tmp_path: Path) -> subprocess.Popen[bytes]:
    container = agent_container()
    security = container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"] and not security.get("privileged")
    caps = ",".join(f"+{cap.lower()}" for cap in security["capabilities"]["add"])
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    proc_sys_net = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "proc-sys-net")
    assert proc_sys_net == f"{env['PYBRIDGE_PROC_SYS']}/net"
    root = tmp_path / "container"  # the container's paths, below a directory of the test's own
    (root / proc_sys_net.lstrip("/")).mkdir(parents=True)
    script = (
        f"mount --bind /proc/sys/net {root}{proc_sys_net} && "
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
        f"exec setpriv --no-new-privs --bounding-set -all,{caps} -- {host.bin_dir}/pybridge agent "
        f"{host.agent_socket}"
    )
    log = open(tmp_path / "confined-agent.log", "wb")  # noqa: SIM115  # the agent's, closed with it
    agent = subprocess.Popen(
        ["ip", "netns", "exec", host.name, "unshare", "--mount", "--propagation", "private", "sh", "-c",
         script],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYBRIDGE_PROC_SYS": f"{root}{env['PYBRIDGE_PROC_SYS']}",
             "PYBRIDGE_METRICS_ADDRESS": f"127.0.0.1:{METRICS_PORT}", "PYBRIDGE_HEALTH_ADDRESS": "off"})
    log.close()
    deadline = time.monotonic() + 20
    while not host.agent_socket.exists():
        assert agent.poll() is None, (tmp_path / "confined-agent.log").read_text()
        assert time.monotonic() < deadline, "agent did not start"
        time.sleep(0.02)
    return agent


def served(host: Host) -> dict[str, float]:
    """The agent's own counts: successful calls by verb, and `declined`."""
    _, body = http_gets(host, "/metrics")
    counts = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "pybridge_cni_calls_total" and sample.labels["code"] == "0":
                counts[sample.labels["verb"]] = sample.value
            elif sample.name == "pybridge_cni_calls_declined_total":
                counts["declined"] = sample.value
    return counts


def test_the_agent_serves_with_the_daemonsets_privileges(host: Host, tmp_path: Path) -> None:
    if host.agent is not None:
        pytest.skip("starts an agent of its own")
    agent = start_confined_agent(host, tmp_path)
    host.agent = agent  # stopped by the fixture's teardown
    conf = bridge_conf(host)  # IPv4 only: the pod's IPv6 is turned off through the bound /proc/sys/net
    pod = host.new_pod()
    result = host.add(conf, pod, container_id="confined")
    assert host.cni("CHECK", {**conf, "prevResult": result}, pod, container_id="confined").ok
    disable_ipv6 = host.pod_exec(pod, "cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout
    assert host.cni("DEL", conf, pod, container_id="confined").ok
    assert served(host) == {"ADD": 1, "CHECK": 1, "DEL": 1, "declined": 0}
    assert disable_ipv6 == b"1\n"
