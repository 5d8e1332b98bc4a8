"""The agent announces a new pod to the node controller (placement.py) only once the runtime has the
ADD's answer, and never for an ADD it undid because its caller went away."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest

from cni_plugin import placement
from cni_plugin.agent import server
from cni_plugin.agent.call import Call
from cni_plugin.agent.server import Agent

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod"}
RESULT = json.dumps({"cniVersion": "1.1.0", "ips": [{"address": "10.1.0.5/24"}]})


def _answered(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, OSError):
        return False


def _serve_one_add(monkeypatch: pytest.MonkeyPatch, caller_gone: bool) -> list[str]:
    """One ADD through Agent._answer, its verb stubbed: what happened, in order."""
    agent = Agent("/nonexistent/agent.sock")
    events: list[str] = []
    call = Call(program="pybridge", caller_env=ENV, env=ENV, stdin=b"{}", config={}, fds=[], pod_fd=None,
                root_fd=None)
    monkeypatch.setattr(server, "unframe", lambda *_a: call)
    monkeypatch.setattr(agent, "_accepted", lambda *_a: True)
    monkeypatch.setattr(agent, "_dispatch", lambda _call: (0, RESULT, ""))

    def run(_program: str, env: dict[str, str], *_a: object) -> int:
        events.append(f"run {env['CNI_COMMAND']}")
        return 0

    monkeypatch.setattr(agent, "_run", run)
    ours, theirs = socket.socketpair()

    def announce(claim: placement.Claim, _path: str) -> bool:
        events.append(f"claim {claim.name}, " + ("answered" if _answered(theirs) else "not answered"))
        return True

    monkeypatch.setattr(placement, "announce", announce)
    with ours, theirs:
        if caller_gone:
            theirs.close()
        with pytest.raises(OSError) if caller_gone else contextlib.nullcontext():
            agent._answer(ours, b"", [], time.monotonic() + 5)
    return events


def test_the_claim_goes_once_the_runtime_has_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _serve_one_add(monkeypatch, caller_gone=False) == ["claim pod, answered"]


def test_an_add_undone_for_a_caller_gone_is_not_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _serve_one_add(monkeypatch, caller_gone=True) == ["run DEL"]
