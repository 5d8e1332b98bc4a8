"""Socket activation without systemd: the agent is spawned as systemd would spawn it, with a
listening socket bound beforehand at fd 3 and LISTEN_FDS/LISTEN_PID set."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin.install import build_client

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent serves root only")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "agent.sock"))
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def client(tmp_path: Path) -> Path:
    """The compiled client with no Python to fall back to: only the agent can answer."""
    (tmp_path / "bin").mkdir()
    build_client(str(tmp_path / "bin" / "pybridge"), str(tmp_path / "no-fallback"))
    os.symlink("pybridge", tmp_path / "bin" / "pyipam")
    return tmp_path / "bin" / "pyipam"


def _activated(fd: int, tmp_path: Path, listen_fds: str = "1") -> subprocess.Popen[bytes]:
    def onto_fd_3() -> None:
        if fd == 3:
            os.set_inheritable(3, True)
        else:
            os.dup2(fd, 3)

    # sh's $$ is the agent's pid once sh execs it, as LISTEN_PID must be.
    return subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m", "cni_plugin", "agent",
         str(tmp_path / "unused.sock")],
        env={**os.environ, "LISTEN_FDS": listen_fds, "PYBRIDGE_LOG_FILE": str(tmp_path / "agent.log")},
        pass_fds=(3,), preexec_fn=onto_fd_3, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _call(client: Path, tmp_path: Path, verb: str, cid: str) -> subprocess.Popen[bytes]:
    conf = {"cniVersion": "1.1.0", "name": "h16-activation",
            "ipam": {"type": "pyipam", "dataDir": str(tmp_path / "ipam"), "subnet": "10.78.0.0/24"}}
    proc = subprocess.Popen([str(client)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
                                 "CNI_NETNS": "/proc/self/ns/net",
                                 "PYBRIDGE_AGENT_SOCKET": str(tmp_path / "agent.sock")})
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(conf).encode())
    proc.stdin.close()
    return proc


def _answer(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, out
    return out


def test_calls_made_before_the_agent_starts_wait_for_it(
    listener: socket.socket, client: Path, tmp_path: Path
) -> None:
    first = _call(client, tmp_path, "ADD", "first")  # queued: nothing accepts yet
    agent = _activated(listener.fileno(), tmp_path)
    try:
        assert json.loads(_answer(first))["ips"][0]["address"] == "10.78.0.2/24"
    finally:
        agent.terminate()
        assert agent.wait(timeout=30) == 0
    # The socket is systemd's: still bound and listening for the next agent.
    assert (tmp_path / "agent.sock").exists()
    second = _call(client, tmp_path, "DEL", "first")
    agent = _activated(listener.fileno(), tmp_path)
    try:
        assert _answer(second) == b""
    finally:
        agent.terminate()
        assert agent.wait(timeout=30) == 0
    assert not [p for p in (tmp_path / "ipam" / "h16-activation").iterdir() if p.name.startswith("10.")]


@pytest.mark.parametrize("listen_fds", ["2", "", "x"])
def test_a_wrong_handover_stops_the_agent_with_a_reason(
    listener: socket.socket, tmp_path: Path, listen_fds: str
) -> None:
    agent = _activated(listener.fileno(), tmp_path, listen_fds)
    out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 2
    assert b"LISTEN_FDS" in out and b"Traceback" not in out


def test_fd_3_must_be_a_listening_unix_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        agent = _activated(unbound.fileno(), tmp_path)
        out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 2
    assert b"not a listening unix stream socket" in out and b"Traceback" not in out
