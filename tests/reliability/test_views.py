"""Issue 13, item 9: an agent that sees other files than its caller must not serve the call.

The agent runs in a private mount namespace with a tmpfs over the test's dataDir (as an agent
in a container with that path not mounted from the host). Calls whose paths it sees as the
caller does are still served by it: every caller of `ip netns exec` has a mount namespace of
its own too."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from testbed.harness import Host, bridge_conf

from .conftest import HostFactory, record


def _start_agent_over_tmpfs(host: Host, hidden: Path, calls: Path) -> None:
    hidden.mkdir(parents=True, exist_ok=True)
    _start_agent_after(host, f"mount -t tmpfs -o mode=0755 pbt-h13-view {hidden}", calls)


def _start_agent_after(host: Host, mount: str, calls: Path) -> None:
    """The host's agent in a private mount namespace where `mount` ran first."""
    script = f"{mount} && exec {host.bin_dir}/pybridge agent {host.agent_socket}"
    host.agent = subprocess.Popen(
        ["ip", "netns", "exec", host.name, "unshare", "--mount", "--propagation", "private",
         "sh", "-c", script],
        env={**os.environ, "PYBRIDGE_LOG_FILE": str(calls)})
    deadline = time.monotonic() + 20
    while not host.agent_socket.exists():
        assert host.agent.poll() is None, "agent exited"
        assert time.monotonic() < deadline, "agent did not start"
        time.sleep(0.02)


def _served_by_agent(host: Host, calls: Path) -> list[str]:
    """ADDs in the agent's call log, read through its own view of the files."""
    assert host.agent is not None
    seen = Path(f"/proc/{host.agent.pid}/root{calls}")
    if not seen.exists():
        return []
    lines = seen.read_text().splitlines()
    return [c["container_id"] for c in map(json.loads, lines) if c.get("verb") == "ADD"]


def test_an_agent_that_sees_another_store_declines(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host()
    # The agent's own log is where only the agent sees it: that must not make it decline.
    calls = host.data_dir / "agent-calls.log"
    _start_agent_over_tmpfs(host, host.data_dir, calls)
    conf = bridge_conf(host)
    first = host.add(conf, host.new_pod(), "through-agent-socket")
    in_process = host.cni("ADD", conf, host.new_pod(), "in-process", env={"PYBRIDGE_AGENT_SOCKET": ""})
    assert in_process.ok, in_process.stdout
    ips = [r["ips"][0]["address"] for r in (first, in_process.out)]
    assert ips[0] != ips[1], f"two pods, one IP: {ips}"
    owners = sorted(host.reservations("testnet").values())
    assert owners == ["in-process\r\neth0", "through-agent-socket\r\neth0"]
    assert _served_by_agent(host, calls) == []
    # A store both see alike (outside the tmpfs): the agent serves it, through its own mount ns.
    shared = tmp_path / "shared-ipam"
    shared_conf = bridge_conf(host, name="shared")
    shared_conf["ipam"]["dataDir"] = str(shared)
    host.add(shared_conf, host.new_pod(), "shared-view")
    assert _served_by_agent(host, calls) == ["shared-view"]
    assert len(os.listdir(shared / "shared")) >= 2  # the reservation and its lock, where the caller looks
    record("agent_views", declined_other_view=1, served_same_view=1)


def test_an_agent_with_a_read_only_store_declines(make_host: HostFactory, tmp_path: Path) -> None:
    """The same files, read-only for the agent (the DaemonSet mounts /var/lib/cni so): it
    declines a call whose dataDir is there, and the caller's ADD succeeds in-process."""
    host = make_host()
    calls = tmp_path / "agent-calls.log"
    host.data_dir.mkdir(parents=True, exist_ok=True)
    _start_agent_after(host, f"mount --bind {host.data_dir} {host.data_dir} && "
                       f"mount -o remount,bind,ro {host.data_dir}", calls)
    result = host.cni("ADD", bridge_conf(host), host.new_pod(), "read-only-view")
    assert result.ok, result.stdout
    assert sorted(host.reservations("testnet").values()) == ["read-only-view\r\neth0"]
    assert _served_by_agent(host, calls) == []
