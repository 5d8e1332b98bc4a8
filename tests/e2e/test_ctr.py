"""Scenario 1: `ctr run --cni`, where the ctr client itself calls pybridge through go-cni."""

from __future__ import annotations

import ipaddress
import json

import pytest

from testbed.node import CTR_NETWORK, CTR_SUBNET, Node, sh, wait_for

pytestmark = pytest.mark.e2e


def _task_pid(node: Node, name: str) -> int | None:
    for line in node.ctr("tasks", "ls", namespace="default").stdout.splitlines()[1:]:
        task, pid, status = line.split()[:3]
        if task == name and status == "RUNNING":
            return int(pid)
    return None


def _eth0_ipv4(pid: int) -> str | None:
    out = sh("nsenter", "-t", str(pid), "-n", "ip", "-j", "-4", "addr", "show", "eth0", check=False).stdout
    addrs = [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])]
    return addrs[0] if addrs else None


def test_ctr_run_cni_container_gets_an_ip_pings_another_and_is_deleted(node: Node) -> None:
    veths_before = node.veths()
    first = node.ctr_run_background("pbt-ctr-a", "sleep", "120")
    try:
        pid = wait_for(lambda: _task_pid(node, "pbt-ctr-a"), 30, "container pbt-ctr-a to run")
        # ctr sets the network up before it starts the task: eth0 is there once it runs.
        ip = _eth0_ipv4(pid)
        assert ip is not None and ipaddress.ip_address(ip) in CTR_SUBNET
        # ctr names the attachment <namespace>-<container>
        assert node.reservations(CTR_NETWORK) == {ip: "default-pbt-ctr-a"}
        second = node.ctr_run("pbt-ctr-b", "ping", "-c", "1", "-W", "3", ip, check=False)
        assert second.returncode == 0, second.stdout + second.stderr
    finally:
        node.ctr("tasks", "kill", "-s", "KILL", "pbt-ctr-a", namespace="default", check=False)
        first.wait(30)

    calls = node.cni_calls()
    # ADD on the task's netns, then (on exit, --rm) DEL with an empty netns path: all succeed.
    # ctr 2.x sends that DEL once more for a task that exited non-zero (a, killed); 1.6 does not.
    dels = {"default-pbt-ctr-a": 2 if node.runtime.major >= 2 else 1, "default-pbt-ctr-b": 1}
    for name, count in dels.items():
        mine = [(c.verb, c.code, c.netns) for c in calls
                if c.container_id == name and c.network == CTR_NETWORK]
        assert [(verb, code) for verb, code, _ in mine] == [("ADD", 0)] + [("DEL", 0)] * count, mine
        assert mine[0][2].startswith("/proc/") and mine[0][2].endswith("/ns/net")
        assert all(netns == "" for _, _, netns in mine[1:])
    assert node.reservations(CTR_NETWORK) == {}
    wait_for(lambda: node.veths() == veths_before, 10, "the containers' veths to go")
