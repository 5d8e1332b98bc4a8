"""Issue 13, items 1 and 2: received fds, running out of fds, slow clients and client deadlines.

Each test plays a broken or hostile peer of the agent (or an agent that never acknowledges or
never answers, for the clients) and checks that nothing leaks and nobody hangs."""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin.agent import wire
from cni_plugin.agent.server import REQUEST_TIMEOUT
from testbed.harness import REFERENCE_PLUGINS, Host, StandInAgent, bridge_conf

from .conftest import HostFactory, record, scale
from .peers import (
    SlowPeers,
    connect,
    host_netns_fd,
    open_fds,
    send_with_fds,
    timed_call,
    version_by_agent,
    wait_for,
)


@pytest.fixture
def agent_host(make_host: HostFactory) -> Iterator[tuple[Host, int]]:
    host = make_host(agent=True)
    own = host_netns_fd(host)
    yield host, own
    os.close(own)


def _bad_frames(own: int, pod_fd: int) -> list[tuple[bytes, list[int]]]:
    """Frames that are never a request, each carrying two fds (the pod netns among them)."""
    claims = wire.REQUEST + bytes(4) + (8).to_bytes(4, "little") + (1 << 19).to_bytes(4, "little") + bytes(4)
    return [
        (b"XXXX" + bytes(16), [own, pod_fd]),  # bad magic
        (wire.REQUEST + b"\xff" * 16, [pod_fd, own]),  # lengths over the limits
        (claims + b"pybr", [own, pod_fd]),  # a body announced, then the sender hangs up
        (os.urandom(64), [pod_fd, pod_fd]),
    ]


def test_received_fds_are_closed_on_every_path(agent_host: tuple[Host, int]) -> None:
    host, own = agent_host
    assert host.agent is not None
    pid = host.agent.pid
    pod = host.new_pod()
    veth = host.add(bridge_conf(host), pod, "held")["interfaces"][1]["name"]
    pod_fd = os.open(f"/run/netns/{pod}", os.O_RDONLY | os.O_CLOEXEC)
    before = open_fds(pid)
    frames = scale(100, 1000)
    kinds = _bad_frames(own, pod_fd)
    for i in range(frames):
        data, fds = kinds[i % len(kinds)]
        with connect(host.agent_socket) as s:
            send_with_fds(s, data, fds)
    stalled = []  # a header, the fds, then nothing: held until the request deadline
    for _ in range(20):
        s = connect(host.agent_socket)
        send_with_fds(s, wire.encode_request(b"pybridge", bytes(64), b"", 0)[:wire.HEADER_LEN], [own, pod_fd])
        stalled.append(s)
    held = wait_for(lambda: open_fds(pid) >= 3 * len(stalled), 5)
    peak = open_fds(pid)
    os.close(pod_fd)
    started = time.monotonic()
    settled = wait_for(lambda: open_fds(pid) <= before + 1, REQUEST_TIMEOUT + 5)
    after = open_fds(pid)
    for s in stalled:
        s.close()
    record("agent_fds_after_bad_frames", frames=frames, stalled=len(stalled), fds_before=before,
           fds_with_stalled=peak, fds_after=after, seconds_to_settle=round(time.monotonic() - started, 1))
    assert held, f"the stalled requests are not held open ({before} -> {peak} fds): the test tests nothing"
    assert settled, f"agent fds {before} -> {after} after {frames} bad frames and {len(stalled)} stalls"
    # The deleted pod netns is not kept alive by an fd the agent forgot: its veth pair goes.
    host.exec("ip", "netns", "del", pod)
    assert wait_for(lambda: veth not in host.links(), 10), "a deleted pod netns is still alive"
    assert host.agent.poll() is None and version_by_agent(host.agent_socket, own)


def test_running_out_of_fds_pauses_accepting_and_never_ends_the_agent(agent_host: tuple[Host, int]) -> None:
    host, own = agent_host
    assert host.agent is not None
    pid = host.agent.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 8, limits[1]))
    peers = []
    for _ in range(12):  # three fds each in the agent: the limit is hit within three
        s = connect(host.agent_socket)
        send_with_fds(s, wire.REQUEST, [own, own])
        peers.append(s)
    time.sleep(1.0)
    alive = host.agent.poll() is None
    for s in peers:
        s.close()
    assert alive, "the agent exited when it ran out of fds"
    assert wait_for(lambda: version_by_agent(host.agent_socket, own), 10)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    assert host.cni("ADD", bridge_conf(host), host.new_pod(), timeout=20).ok


def test_slow_clients_never_hold_a_real_call(agent_host: tuple[Host, int]) -> None:
    host, own = agent_host
    peers = SlowPeers(host.agent_socket, 70, [own, own])  # more than the agent's 64 serving slots
    try:
        time.sleep(1.5)
        started = time.monotonic()
        reply = host.cni("ADD", bridge_conf(host), host.new_pod(), timeout=20)
        took = time.monotonic() - started
        assert reply.ok, reply.stdout
        assert took < 5, f"ADD took {took:.1f}s behind slow clients"
        assert version_by_agent(host.agent_socket, own), "declined: slow clients held the agent"
        # One deadline per request, not per byte: tricklers are cut off too.
        assert wait_for(lambda: peers.reopened_tricklers > 0, REQUEST_TIMEOUT + 5)
    finally:
        peers.close()


class SilentAgent(StandInAgent):
    """An agent that never acknowledges (`ack=False`: it never even accepts), or acknowledges,
    takes the GO and never answers."""

    def __init__(self, path: Path, ack: bool) -> None:
        super().__init__(path, serve=ack)

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)
        conn.recv(1 << 20)
        conn.sendall(wire.ACCEPTED)


@pytest.mark.parametrize("client", ["compiled", "python"])
def test_clients_have_deadlines_for_the_ack_and_for_the_answer(make_host: HostFactory, client: str) -> None:
    host = make_host()
    plugin = "pybridge" if client == "compiled" else str(host.bin_dir.parent / "libexec" / "pybridge")
    conf = bridge_conf(host)
    silent = SilentAgent(host.agent_socket, ack=False)
    try:
        pod = host.new_pod()
        started = time.monotonic()
        reply = host.cni("ADD", conf, pod, plugin=plugin, timeout=30)
        unacked = time.monotonic() - started
    finally:
        silent.close()
    assert reply.ok, reply.stdout  # not acknowledged in time: served in-process
    assert host.pod_exec(pod, "ip", "link", "show", "eth0", check=False).returncode == 0
    host.agent_socket.unlink()
    mute = SilentAgent(host.agent_socket, ack=True)
    try:
        started = time.monotonic()
        reply = host.cni("ADD", conf, host.new_pod(), "c2", plugin=plugin, timeout=30,
                         env={wire.ANSWER_TIMEOUT_ENV: "2"})
        unanswered = time.monotonic() - started
    finally:
        mute.close()
    assert reply.rc != 0 and reply.out["code"] == 999 and "in time" in reply.out["msg"], reply.stdout
    assert len(host.reservations("testnet")) == 1, "the unanswered call was served a second time"
    record(f"client_deadlines[{client}]", unacknowledged_seconds=round(unacked, 2),
           unanswered_seconds=round(unanswered, 2))


def _add_del_latencies(host: Host, own: int, pod: str, count: int) -> list[float]:
    env = {"CNI_CONTAINERID": "bench", "CNI_NETNS": f"/run/netns/{pod}", "CNI_IFNAME": "eth0",
           "CNI_PATH": f"{host.bin_dir}:{REFERENCE_PLUGINS}", "PYBRIDGE_AGENT_SOCKET": str(host.agent_socket),
           "PATH": os.environ["PATH"]}
    stdin = json.dumps(bridge_conf(host)).encode()
    client = host.bin_dir / "pybridge"
    times = []
    for _ in range(count):
        took, proc = timed_call(client, own, {**env, "CNI_COMMAND": "ADD"}, stdin)
        assert proc.returncode == 0, proc.stdout
        times.append(took * 1000)
        assert timed_call(client, own, {**env, "CNI_COMMAND": "DEL"}, stdin)[1].returncode == 0
    return times


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def test_add_latency_with_200_slow_connections_open(make_host: HostFactory, tmp_path: Path) -> None:
    """The benchmark of item 2 (figures only, no speed assertion): ADD/DEL through the agent,
    idle and with 200 stalled or trickling connections open. Every call is the agent's."""
    host = make_host()
    calls = tmp_path / "agent-calls.log"
    host.start_agent(tmp_path / "agent.log", env={"PYBRIDGE_LOG_FILE": str(calls)})
    own = host_netns_fd(host)
    pod = host.new_pod()
    count = scale(20, 200)
    try:
        _add_del_latencies(host, own, pod, 3)  # warm-up: first calls import and cache
        idle = _add_del_latencies(host, own, pod, count)
        peers = SlowPeers(host.agent_socket, 200, [own, own])
        try:
            time.sleep(1.0)
            slow = _add_del_latencies(host, own, pod, count)
        finally:
            peers.close()
    finally:
        os.close(own)
    served = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sum(1 for c in served if c.get("verb") == "ADD" and c["code"] == 0) == 2 * count + 3
    record("add_with_200_slow_connections", adds=count, machine_load="shared, other helpers' tests running",
           idle_p50_ms=round(statistics.median(idle), 2), idle_p99_ms=round(_p99(idle), 2),
           slow_p50_ms=round(statistics.median(slow), 2), slow_p99_ms=round(_p99(slow), 2),
           p99_ratio=round(_p99(slow) / _p99(idle), 2), slow_peers_reopened=peers.reopened)
