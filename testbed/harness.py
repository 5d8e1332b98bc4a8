"""A throw-away "host" netns per test, pod netns beside it, and the plugin exec'd inside the host.

This mirrors the reference plugins' tests: the plugin never runs in the machine's own netns,
so bridges, routes and rules it makes vanish with the test's namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEST_PREFIX = "pbt-"
# This run's mark in every netns it names, so that the suite's leak check (tests/conftest.py)
# does not count the namespaces of another run on the same machine.
RUN_MARK = os.environ.setdefault("PYBRIDGE_TEST_RUN", secrets.token_hex(2))
BUSYBOX = "/bin/busybox"
REFERENCE_PLUGINS = "/usr/lib/cni"


def sh(
    *cmd: str, check: bool = True, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, input=input, capture_output=True, check=check, timeout=timeout)


def new_netns(tag: str) -> str:
    name = f"{TEST_PREFIX}{RUN_MARK}-{tag}-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    return name


def delete_netns(name: str) -> None:
    sh("ip", "netns", "del", name, check=False)


@dataclass
class Reply:
    rc: int
    out: Any
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Host:
    """A host netns with the pod netns made for it; `cni()` execs a plugin inside the host.

    Plugins run through the installed launchers in `bin_dir`, which forward to the agent at
    `agent_socket` when one listens there and serve the call in-process otherwise.
    """

    name: str
    data_dir: Path
    bin_dir: Path
    agent_socket: Path
    pods: list[str] = field(default_factory=list)
    agent: subprocess.Popen[bytes] | None = None

    def start_agent(self, log_path: Path, env: dict[str, str] | None = None) -> None:
        with open(log_path, "wb") as log:
            self.agent = subprocess.Popen(
                ["ip", "netns", "exec", self.name, str(self.bin_dir / "pybridge"), "agent",
                 str(self.agent_socket)], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 20
        while not self.agent_socket.exists():
            assert self.agent.poll() is None, f"agent exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.02)

    def stop_agent(self) -> int | None:
        if self.agent is None:
            return None
        self.agent.terminate()
        code = self.agent.wait(timeout=30)
        self.agent = None
        return code

    def exec(
        self, *cmd: str, check: bool = True, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check, input=input, timeout=timeout)

    def new_pod(self) -> str:
        name = new_netns("pod")
        self.pods.append(name)
        return name

    def pod_exec(self, pod: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return sh("ip", "netns", "exec", pod, *cmd, check=check)

    def ping(self, pod: str, address: str) -> bool:
        return self.pod_exec(pod, BUSYBOX, "ping", "-c", "1", "-W", "2", address, check=False).returncode == 0

    def cni(
        self,
        command: str,
        conf: dict[str, Any],
        pod: str | None = None,
        container_id: str = "c1",
        ifname: str = "eth0",
        plugin: str = "pybridge",
        netns_path: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float = 60,
    ) -> Reply:
        """One call; `stdin` replaces the JSON of `conf` when given."""
        path = netns_path if netns_path is not None else (f"/run/netns/{pod}" if pod else "")
        variables = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": f"{self.bin_dir}:{REFERENCE_PLUGINS}",
            "PYBRIDGE_AGENT_SOCKET": str(self.agent_socket),
            **(env or {}),
        }
        binary = plugin if plugin.startswith("/") else str(self.bin_dir / plugin)
        if not os.path.exists(binary):
            binary = os.path.join(REFERENCE_PLUGINS, plugin)
        envs = [f"{k}={v}" for k, v in variables.items()]
        proc = self.exec("env", "-i", f"PATH={os.environ['PATH']}", *envs, binary, check=False,
                         input=json.dumps(conf).encode() if stdin is None else stdin, timeout=timeout)
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return Reply(proc.returncode, out, proc.stdout, proc.stderr)

    def add(
        self, conf: dict[str, Any], pod: str, container_id: str = "c1", ifname: str = "eth0"
    ) -> dict[str, Any]:
        reply = self.cni("ADD", conf, pod, container_id, ifname)
        assert reply.ok, f"ADD failed: {reply.stdout!r} {reply.stderr!r}"
        assert isinstance(reply.out, dict)
        return reply.out

    def settle_veths(self, expected: int, timeout: float = 5.0) -> list[str]:
        """The host veths once at most `expected` are left. The agent answers DEL once the pod is
        out of service and the kernel's slow veth deletion finishes after the reply."""
        deadline = time.monotonic() + timeout
        while True:
            veths = [name for name, link in self.links().items()
                     if link.get("linkinfo", {}).get("info_kind") == "veth"]
            if len(veths) <= expected or time.monotonic() > deadline:
                return veths
            time.sleep(0.02)

    def links(self) -> dict[str, dict[str, Any]]:
        raw = self.exec("ip", "-d", "-j", "link", "show").stdout
        return {link["ifname"]: link for link in json.loads(raw)}

    def reservations(self, network: str) -> dict[str, str]:
        """IP -> file content of the host-local style store."""
        directory = self.data_dir / network
        if not directory.exists():
            return {}
        return {p.name: p.read_bytes().decode() for p in directory.iterdir()
                if p.name != "lock" and not p.name.startswith("last_reserved_ip")}

    def destroy(self) -> None:
        self.stop_agent()
        for pod in self.pods:
            delete_netns(pod)
        delete_netns(self.name)


def pod_json(host: Host, pod: str, *args: str) -> Any:
    return json.loads(host.pod_exec(pod, "ip", "-j", *args).stdout)


def bridge_conf(host: Host, name: str = "testnet", **overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": "1.1.0",
        "name": name,
        "type": "pybridge",
        "bridge": "br-test",
        "isGateway": True,
        "ipam": {
            "type": "pyipam",
            "dataDir": str(host.data_dir),
            "ranges": [[{"subnet": "10.88.0.0/24"}]],
        },
    }
    conf.update(overrides)
    return conf


class StandInAgent:
    """Listens where the agent would; with `serve`, a thread accepts connections and hands each to
    `handle` (which subclasses define), else connections wait in the backlog, never accepted."""

    def __init__(self, path: Path, serve: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.held: list[socket.socket] = []
        if serve:
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
