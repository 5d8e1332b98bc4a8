"""The agent decodes a call's stdin once: unframing it, judging the caller's view of its paths,
serving it (and answering "busy") all read the one decoded config."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.agent import call as agent_call
from cni_plugin.agent import views, wire
from cni_plugin.agent.server import Agent
from cnikit import programs
from ipam.index import Indexes


def _counting_loads(monkeypatch: pytest.MonkeyPatch, stdin: bytes) -> list[int]:
    """Counts json.loads of `stdin` (as bytes or text) anywhere in the process."""
    seen: list[int] = []
    real = json.loads

    def loads(text: str | bytes, **kwargs: Any) -> Any:
        if (text.encode() if isinstance(text, str) else bytes(text)) == stdin:
            seen.append(1)
        return real(text, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    return seen


def _frame(stdin: bytes, env: dict[str, str]) -> bytes:
    blob = b"\0".join(f"{k}={v}".encode() for k, v in env.items())
    return wire.encode_request(programs.PYIPAM.encode(), blob, stdin, wire.FLAG_ROOT)


def test_an_add_through_the_agent_decodes_its_stdin_once(tmp_path: Path, ipam_indexes: Indexes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    conf = {"cniVersion": "1.1.0", "name": "once", "type": "pybridge",
            "ipam": {"type": "pyipam", "dataDir": str(tmp_path), "ranges": [[{"subnet": "10.78.0.0/28"}]]}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
    stdin = json.dumps(conf).encode()
    seen = _counting_loads(monkeypatch, stdin)
    call = agent_call.unframe(_frame(stdin, env), [], {})
    root = os.open("/", os.O_PATH)
    try:
        assert views.caller_sees_the_same(root, call.config, call.caller_env)
    finally:
        os.close(root)
    agent = Agent("unused", ipam_indexes=ipam_indexes)
    out, err = io.StringIO(), io.StringIO()
    code = agent._run(call.program, call.env, call.stdin, out, err, None, call.config)
    assert code == 0, (out.getvalue(), err.getvalue())
    assert json.loads(out.getvalue())["ips"][0]["address"] == "10.78.0.2/28"
    agent_call.busy(call, 1.0)
    assert len(seen) == 1


def test_junk_stdin_still_gets_the_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
    call = agent_call.unframe(_frame(b"[1, 2]", env), [], {})
    assert call.config is None
    assert list(views.call_paths(call.config, call.caller_env)) == []
    out = io.StringIO()
    code = Agent("unused")._run(call.program, call.env, call.stdin, out, io.StringIO(), None, call.config)
    assert code == 1
    assert json.loads(out.getvalue())["code"] == 6  # DECODE_FAILURE
