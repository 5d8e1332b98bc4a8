"""A node without `nft` (and without iptables): ADD needs nft only for what the config asks of it,
fails with a spec error naming the package otherwise, and the agent and the in-process fallback
answer alike. The binaries are hidden by bind mounts in a private mount namespace of the call
(and of the agent), never on the machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.harness import Host, bridge_conf, new_netns

pytestmark = pytest.mark.netns
HIDDEN = ("nft", "iptables", "ip6tables")


def _hiding() -> list[str]:
    """A command prefix that runs the rest with HIDDEN's binaries replaced by /dev/null (not
    executable, so not found), in a mount namespace of its own."""
    targets = sorted({os.path.realpath(found) for name in HIDDEN if (found := shutil.which(name))})
    mounts = "".join(f"mount --bind /dev/null {target} && " for target in targets)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts}exec "$@"', "sh"]


@pytest.fixture
def hosts(tmp_path: Path, launchers: Path) -> Iterator[dict[str, Host]]:
    """One host served in-process, one by an agent, both without nft and iptables."""
    made = {mode: Host(name=new_netns("host"), data_dir=tmp_path / mode / "ipam", bin_dir=launchers,
                       agent_socket=tmp_path / mode / "agent.sock") for mode in ("inprocess", "agent")}
    agent = made["agent"]
    try:
        agent.agent_socket.parent.mkdir(parents=True)
        with open(tmp_path / "agent.log", "wb") as log:
            agent.agent = subprocess.Popen(["ip", "netns", "exec", agent.name, *_hiding(),
                                            str(launchers / "pybridge"), "agent", str(agent.agent_socket)],
                                           stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not agent.agent_socket.exists():
            log_text = (tmp_path / "agent.log").read_text
            assert agent.agent.poll() is None and time.monotonic() < deadline, log_text()
            time.sleep(0.02)
        yield made
        assert agent.stop_agent() == 0, (tmp_path / "agent.log").read_text()
    finally:
        for host in made.values():
            host.destroy()


def _call(host: Host, command: str, conf: dict[str, Any], pod: str) -> tuple[int, Any]:
    env = ["CNI_COMMAND=" + command, "CNI_CONTAINERID=c1", f"CNI_NETNS=/run/netns/{pod}", "CNI_IFNAME=eth0",
           f"CNI_PATH={host.bin_dir}", f"PYBRIDGE_AGENT_SOCKET={host.agent_socket}"]
    proc = host.exec(*_hiding(), "env", "-i", f"PATH={os.environ['PATH']}", *env,
                     str(host.bin_dir / "pybridge"), check=False, input=json.dumps(conf).encode())
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def _both(hosts: dict[str, Host], command: str, **overrides: Any) -> tuple[int, Any]:
    """The one answer both paths give (ADD results differ in MACs and names, so only errors and
    the exit status are compared whole)."""
    answers = {}
    for mode, host in hosts.items():
        pod = host.pods[0] if host.pods and command != "ADD" else host.new_pod()
        answers[mode] = _call(host, command, bridge_conf(host, **overrides), pod)
    (rc, out), (agent_rc, agent_out) = answers["inprocess"], answers["agent"]
    assert rc == agent_rc, answers
    if rc != 0:
        assert out == agent_out, answers
    return rc, out


def test_source_check_names_nftables(hosts: dict[str, Host]) -> None:
    rc, out = _both(hosts, "ADD")
    assert rc != 0 and out["code"] == 121 and out["msg"] == "sourceCheck needs nft", out
    assert "install nftables, or set sourceCheck false" in out["details"], out
    for host in hosts.values():
        assert host.reservations("testnet") == {}, "a failed ADD unwinds its reservation"


def test_add_and_del_without_masquerade_need_no_nft(hosts: dict[str, Host]) -> None:
    rc, out = _both(hosts, "ADD", sourceCheck=False)
    assert rc == 0 and out["ips"][0]["address"].startswith("10.88.0."), out
    assert _both(hosts, "DEL", sourceCheck=False) == (0, None)
    for host in hosts.values():
        assert host.reservations("testnet") == {}


@pytest.mark.parametrize(("backend", "msg", "details"), [
    (None, "masquerade needs nft or iptables", "neither in PATH or sbin: install nftables"),
    ("nftables", "masquerade needs nft", "not in PATH or sbin: install nftables"),
    ("iptables", "masquerade needs iptables", "not in PATH or sbin: install iptables"),
])
def test_masquerade_names_the_package(hosts: dict[str, Host], backend: str | None, msg: str,
                                      details: str) -> None:
    extra = {"ipMasqBackend": backend} if backend else {}
    rc, out = _both(hosts, "ADD", sourceCheck=False, ipMasq=True, **extra)
    assert rc != 0 and (out["code"], out["msg"]) == (120, msg), out
    assert out["details"] == f"{details}, or set ipMasq false", out
    for host in hosts.values():
        assert host.reservations("testnet") == {} and host.settle_veths(0) == []
