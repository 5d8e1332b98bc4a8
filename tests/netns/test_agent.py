"""The fast path's contract: forwarded or not, a call is served exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin import link, netns
from cni_plugin.agent import wire
from cni_plugin.host import Kernel
from testbed.harness import Host, StandInAgent, bridge_conf, pod_json

pytestmark = pytest.mark.netns


class FakeAgent(StandInAgent):
    """Answers every call with `reply` (bytes), then closes."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.reply = reply
        self.calls = 0
        super().__init__(path)

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(1 << 20)
            self.calls += 1
            if not self.reply.startswith(wire.ACCEPTED):
                conn.sendall(self.reply)
                return
            conn.sendall(wire.ACCEPTED)
            conn.recv(len(wire.GO))  # the client's GO: from here the call is the agent's
            conn.sendall(self.reply[len(wire.ACCEPTED):])


@pytest.fixture
def fake_agent(host: Host) -> Iterator[type[FakeAgent]]:
    if host.agent is not None:
        pytest.skip("needs the agent's socket path free")
    made: list[FakeAgent] = []

    def make(reply: bytes) -> FakeAgent:
        agent = FakeAgent(host.agent_socket, reply)
        made.append(agent)
        return agent

    yield make  # type: ignore[misc]
    for agent in made:
        agent.close()


def _has_eth0(host: Host, pod: str) -> bool:
    return any(link["ifname"] == "eth0" for link in pod_json(host, pod, "link", "show"))


def test_agent_gone_before_accepting_means_served_in_process(host: Host, fake_agent: type[FakeAgent]) -> None:
    agent = fake_agent(b"")  # closes without ACCEPTED: it did nothing
    pod = host.new_pod()
    result = host.add(bridge_conf(host), pod)
    assert agent.calls == 1
    assert _has_eth0(host, pod) and result["ips"]


def test_declined_call_is_served_in_process(host: Host, fake_agent: type[FakeAgent]) -> None:
    agent = fake_agent(wire.DECLINED)
    pod = host.new_pod()
    host.add(bridge_conf(host), pod)
    assert agent.calls == 1 and _has_eth0(host, pod)


def test_agent_failing_after_accepting_is_an_error_not_a_second_try(
    host: Host, fake_agent: type[FakeAgent]
) -> None:
    agent = fake_agent(wire.ACCEPTED)  # accepts, takes the GO, then dies without an answer
    pod = host.new_pod()
    reply = host.cni("ADD", bridge_conf(host), pod)
    assert reply.rc != 0 and reply.out["code"] == 999
    assert "agent" in reply.out["msg"]
    assert agent.calls == 1
    assert not _has_eth0(host, pod), "the call was served a second time in-process"
    assert host.reservations("testnet") == {}


def test_python_launcher_forwards_to_the_agent_too(host: Host) -> None:
    if host.agent is None:
        pytest.skip("needs the agent")
    launcher = host.bin_dir.parent / "libexec" / "pybridge"
    pod = host.new_pod()
    reply = host.cni("ADD", bridge_conf(host), pod, plugin=str(launcher))
    assert reply.ok, reply.stdout
    assert _has_eth0(host, pod)
    assert host.cni("DEL", bridge_conf(host), pod, plugin=str(launcher)).ok


def test_agent_serves_ipam_calls_for_the_reference_bridge(host: Host) -> None:
    conf = bridge_conf(host, cniVersion="1.0.0", type="bridge")
    pod = host.new_pod()
    reply = host.cni("ADD", conf, pod, plugin="bridge")
    assert reply.ok, reply.stdout
    assert host.cni("DEL", conf, pod, plugin="bridge").ok
    assert host.reservations("testnet") == {}


def test_agent_logs_calls_to_its_own_log_file(host: Host, tmp_path: Path) -> None:
    if host.agent is None:
        pytest.skip("needs the agent")
    host.stop_agent()
    log_file = tmp_path / "agent-calls.log"
    host.start_agent(tmp_path / "agent2.log", env={"PYBRIDGE_LOG_FILE": str(log_file)})
    host.add(bridge_conf(host), host.new_pod(), "logged-by-agent")
    calls = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(c["verb"], c["container_id"], c["code"]) for c in calls] == [("ADD", "logged-by-agent", 0)]


def test_agent_finishes_pending_removals_before_it_exits(host: Host) -> None:
    if host.agent is None:
        pytest.skip("needs the agent")
    conf = bridge_conf(host)
    pods = [host.new_pod() for _ in range(4)]
    veths = [host.add(conf, pod, f"drain-{i}")["interfaces"][1]["name"] for i, pod in enumerate(pods)]
    for i, pod in enumerate(pods):
        assert host.cni("DEL", conf, pod, f"drain-{i}").ok
    assert host.stop_agent() == 0  # SIGTERM right after the replies
    assert not set(veths) & set(host.links())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_agent_with_0_and_the_next_takes_over_a_stale_socket(
        host: Host, tmp_path: Path, signum: int) -> None:
    if host.agent is None:
        pytest.skip("needs the agent")
    conf = bridge_conf(host)
    host.add(conf, host.new_pod(), "before")
    started = time.monotonic()
    host.agent.send_signal(signum)
    assert host.agent.wait(timeout=30) == 0
    assert time.monotonic() - started < 5
    host.agent = None
    assert not host.agent_socket.exists()
    stale = socket.socket(socket.AF_UNIX)  # what an agent killed with -9 leaves: bound, no listener
    stale.bind(str(host.agent_socket))
    stale.close()
    log_file = tmp_path / "agent-calls.log"
    host.start_agent(tmp_path / "agent2.log", env={"PYBRIDGE_LOG_FILE": str(log_file)})
    deadline = time.monotonic() + 20
    while True:  # (the probe is logged as a truncated request)
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(host.agent_socket)) == 0:
                break
        assert time.monotonic() < deadline, "the new agent did not take the socket over"
        time.sleep(0.05)
    host.add(conf, host.new_pod(), "after")
    calls = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [c["container_id"] for c in calls if c["event"] == "cni_call"] == ["after"]  # served by the agent


def _gone(host: Host, names: set[str], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while names & set(host.links()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _not_ours(host: Host) -> set[str]:
    """Links the agent must never delete: one in its removal group without its mark, one with
    its mark's alias outside the group."""
    host.exec("ip", "link", "add", "pbt-grp", "group", str(link.REMOVAL_GROUP), "type", "veth", "peer",
              "name", "pbt-grp-peer")
    host.exec("ip", "link", "add", "pbt-alias", "type", "veth", "peer", "name", "pbt-alias-peer")
    host.exec("ip", "link", "set", "pbt-alias", "alias", link.REMOVAL_ALIAS)
    return {"pbt-grp", "pbt-grp-peer", "pbt-alias", "pbt-alias-peer"}


def test_deferred_removals_complete_and_spare_links_not_ours(host: Host) -> None:
    if host.agent is None:
        pytest.skip("needs the agent")
    conf = bridge_conf(host)
    pods = [host.new_pod() for _ in range(6)]
    keep: set[str] = set()
    for batch in (pods[:3], pods[3:]):  # the first batch alone in the group, the second not
        veths = {host.add(conf, pod, pod)["interfaces"][1]["name"] for pod in batch}
        for pod in batch:
            assert host.cni("DEL", conf, pod, pod).ok
        assert _gone(host, veths)  # the agent still runs: removed in the background, within bounds
        assert keep <= set(host.links())
        keep = keep or _not_ours(host)
    for pod in pods:
        assert [lnk["ifname"] for lnk in pod_json(host, pod, "link", "show")] == ["lo"]


def test_the_next_agent_removes_links_a_dead_agent_marked_but_no_others(host: Host) -> None:
    if host.agent is None:
        pytest.skip("needs the agent")
    host.stop_agent()
    # What an agent killed between a DEL and its sweep leaves: the host end marked for removal.
    host.exec("ip", "link", "add", "pbt-left", "type", "veth", "peer", "name", "pbt-left-peer")
    host.exec("ip", "link", "set", "pbt-left", "group", str(link.REMOVAL_GROUP), "alias", link.REMOVAL_ALIAS)
    keep = _not_ours(host)
    host.start_agent(host.agent_socket.parent / "agent2.log")
    assert _gone(host, {"pbt-left", "pbt-left-peer"})
    assert keep <= set(host.links())


def test_a_detached_pod_end_marks_its_host_end_and_one_request_deletes_the_group(host: Host) -> None:
    """The batch path itself (the tests above also pass one link at a time): only a port of the
    network's bridge is marked, and the sweep deletes it by group."""
    if host.agent is not None:
        pytest.skip("calls the plugin's functions directly: one run is enough")
    conf = bridge_conf(host)
    pod = host.new_pod()
    veth = host.add(conf, pod, "marked")["interfaces"][1]["name"]
    host_fd = os.open(f"/run/netns/{host.name}", os.O_RDONLY)
    pod_fd = os.open(f"/run/netns/{pod}", os.O_RDONLY)

    kernel = Kernel()

    def detach_and_mark() -> tuple[bool, bool]:
        detached = netns.run_in(pod_fd, lambda: link.pod_detach(kernel, "eth0"))
        assert detached is not None
        pod_end, _port = detached
        with link.netlink(kernel) as sock:
            end = link.verified_host_end(sock, sock.nsid(pod_fd), pod_end)
            assert end is not None
            return (link.mark_host_end(sock, end, "br-other"),
                    link.mark_host_end(sock, end, conf["bridge"]))

    try:
        assert netns.run_in(host_fd, detach_and_mark) == (False, True)
        shown = host.links()[veth]
        assert (shown["group"], shown["ifalias"]) == (str(link.REMOVAL_GROUP), link.REMOVAL_ALIAS)
        netns.run_in(host_fd, link.sweeper(kernel))
        assert veth not in host.links()
        assert [lnk["ifname"] for lnk in pod_json(host, pod, "link", "show")] == ["lo"]
    finally:
        os.close(host_fd)
        os.close(pod_fd)
