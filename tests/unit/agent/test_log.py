"""Logs are bound per call: two calls of one agent in flight at once, each with its own logFile,
find only their own lines (and their own IPAM notices) in it; the agent's own log exists from
its start. No root: the agent serves pyipam calls on a socket in a temp dir."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.agent import server
from cni_plugin.agent.forward import forward
from cnikit import log, skel
from cnikit.spec.errors import CNIError
from ipam import verbs as ipam_verbs


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[server.Agent]:
    agent = server.Agent(str(tmp_path / "agent.sock"))
    agent.bind()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    yield agent
    agent.stop()
    thread.join(10)


def _conf(tmp_path: Path, name: str) -> dict[str, Any]:
    data_dir = tmp_path / f"data-{name}"
    (data_dir / name).mkdir(parents=True, mode=0o755)
    (data_dir / name / "junk").write_bytes(b"not mine")  # makes the store report a notice
    return {"cniVersion": "1.1.0", "name": name, "type": "pybridge", "logFile": str(tmp_path / f"{name}.log"),
            "ipam": {"type": "pyipam", "dataDir": str(data_dir), "ranges": [[{"subnet": "10.9.0.0/29"}]]}}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_concurrent_agent_calls_write_only_into_their_own_log_files(
    agent: server.Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_in_flight = threading.Barrier(2, timeout=10)
    real_add = ipam_verbs.VERBS["ADD"]

    def add_when_both_run(req: skel.Request) -> dict[str, Any] | None:
        both_in_flight.wait()  # each call's log is open before either writes a line
        return real_add(req)

    monkeypatch.setitem(ipam_verbs.VERBS, "ADD", add_when_both_run)
    replies: dict[str, tuple[int, bytes, bytes] | None] = {}

    def call(name: str) -> None:
        env = {b"CNI_COMMAND": b"ADD", b"CNI_CONTAINERID": f"ctr-{name}".encode(), b"CNI_IFNAME": b"eth0",
               b"CNI_NETNS": f"/proc/{os.getpid()}/ns/net".encode(), b"CNI_PATH": b"/nonexistent"}
        stdin = json.dumps(_conf(tmp_path, name)).encode()
        replies[name] = forward(b"pyipam", stdin, env, agent.path.encode())

    threads = [threading.Thread(target=call, args=(name,)) for name in ("neta", "netb")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for name in ("neta", "netb"):
        reply = replies[name]
        assert reply is not None and reply[0] == 0, reply
        assert b"junk: not a reservation file" in reply[2]  # the notice on the call's stderr
        lines = _lines(tmp_path / f"{name}.log")
        calls = [(line["event"], line.get("container_id")) for line in lines if line["event"] == "cni_call"]
        assert calls == [("cni_call", f"ctr-{name}")]
        notices = [line["message"] for line in lines if line["event"] == "notice"]
        assert len(notices) == 1 and f"data-{name}/{name}/junk" in notices[0]


def test_the_process_log_is_created_at_once_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_process", log.NOWHERE)
    path = tmp_path / "agent.log"
    log.open_process_log({log.ENV_VAR: str(path)}).warning("agent_bad_request", error="x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [line["event"] for line in _lines(path)] == ["agent_bad_request"]
    log.process().close()


def test_a_log_file_someone_else_made_is_refused_with_code_7(tmp_path: Path) -> None:
    path = tmp_path / "readable.log"
    path.write_text("")
    os.chmod(path, 0o644)
    with pytest.raises(CNIError) as err:
        log.for_call(str(path), {})
    assert err.value.code == 7 and "readable.log" in str(err.value.details)


def test_without_a_log_file_notices_still_reach_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    log.for_call(None, {}, echo=sys.stderr).notice("store: skipped a file")
    assert capsys.readouterr().err == "store: skipped a file\n"
