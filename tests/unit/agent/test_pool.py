"""The agent's serving threads are a fixed pool: a call that fails in a way nobody foresaw costs
neither a thread nor a slot, and stop() waits for the calls already handed over."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cni_plugin.agent.intake import Incoming
from cni_plugin.agent.server import Agent


def _call() -> Incoming:
    ours, _theirs = socket.socketpair()
    return Incoming(ours, time.monotonic() + 5)


def test_a_failing_call_costs_no_thread_and_no_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = Agent("unused", max_concurrent=1)
    served: list[int] = []

    def answer(*_args: object) -> None:
        served.append(len(served))
        if len(served) == 1:
            raise RuntimeError("a bug")

    monkeypatch.setattr(agent, "_answer", answer)
    server = threading.Thread(target=agent._serve_queue, daemon=True)
    server.start()
    first, second = _call(), _call()
    agent._start(first)
    deadline = time.monotonic() + 5
    while served != [0] and time.monotonic() < deadline:
        time.sleep(0.01)
    agent._start(second)  # one slot: taken again only if the failed call gave it back
    agent.stop(drain_timeout=5)
    server.join(5)
    assert served == [0, 1]
    assert not server.is_alive()
    assert first.conn.fileno() == -1 and second.conn.fileno() == -1  # both connections closed


def test_the_collector_never_runs_beside_a_call_on_its_attachment(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_alone (the collector's DEL) runs nothing while a call holds or awaits the attachment's
    lock, runs the verb under that lock otherwise, and nothing once the agent stops."""
    agent = Agent("unused", max_concurrent=1)
    ran: list[tuple[str, str]] = []

    def run(_program: str, env: dict[str, str], *_args: object) -> int:
        ran.append((env["CNI_COMMAND"], env["CNI_CONTAINERID"]))
        return 0

    monkeypatch.setattr(agent, "_run", run)
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"}
    holding, release = threading.Event(), threading.Event()

    def call_in_flight() -> None:
        with agent._attachment(("c1", "eth0")):
            holding.set()
            release.wait(5)

    caller = threading.Thread(target=call_in_flight, daemon=True)
    caller.start()
    assert holding.wait(5)
    assert agent.attachments_in_flight() == {("c1", "eth0")}
    assert agent.run_alone(("c1", "eth0"), env, b"{}") is None and ran == []
    release.set()
    caller.join(5)
    assert agent.attachments_in_flight() == set()
    assert agent.run_alone(("c1", "eth0"), env, b"{}") == (0, "") and ran == [("DEL", "c1")]
    agent.stop(drain_timeout=1)
    assert agent.run_alone(("c1", "eth0"), env, b"{}") is None and len(ran) == 1
