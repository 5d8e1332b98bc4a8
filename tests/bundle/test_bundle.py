"""The frozen bundle on a node without Python: VERSION, ADD, CHECK, DEL from inside a chroot.

The chroot is a Debian bookworm minbase root (no python3: asserted), the bundle is installed
into it the way the DaemonSet's init step does it (versioned copy + symlinks, node/bundle.py),
and every call runs as `ip netns exec <throw-away host netns> ... chroot <root> /opt/cni/bin/...`.
/proc and /run/netns are bind-mounted into the root inside the mount namespace that
`ip netns exec` makes for that one call (a slave of the machine's), so they vanish with the call,
also when a test fails, and never propagate back.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.node.bundle import install_bundle
from testbed.harness import BUSYBOX, delete_netns, new_netns, sh

from . import rootfs

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for chroot and network namespaces"),
]

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "dist" / "pybridge"
SUBNET = "10.89.0.0/24"


@pytest.fixture(scope="session")
def bundle() -> Path:
    """`make bundle`'s output, (re)built if a source is newer (make decides; no-op when current)."""
    subprocess.run(["make", "-s", "-C", str(REPO), "dist/pybridge/pybridge"], check=True, timeout=900)
    assert (BUNDLE / "pybridge").is_file() and (BUNDLE / "pyipam").is_symlink()
    return BUNDLE


@pytest.fixture(scope="session")
def node_root(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = rootfs.minbase_root()
    root = rootfs.copy_root(base, tmp_path_factory.mktemp("chroot") / "root")
    try:
        install_bundle(
            str(bundle),
            bin_dir=str(root / "opt/cni/bin"),
            store_dir=str(root / "opt/pybridge"),
            host_store_dir="/opt/pybridge",
        )
        (root / "run/netns").mkdir(parents=True, exist_ok=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Node:
    """A throw-away host netns; plugins run chrooted into `root` inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = new_netns("bhost")
        self.pods: list[str] = []
        sh("ip", "netns", "exec", self.host, "ip", "link", "set", "lo", "up")

    def chroot(
        self, argv: list[str], env: dict[str, str], stdin: bytes = b"", background: bool = False
    ) -> Any:
        r = shlex.quote(str(self.root))
        script = (
            f"mount --rbind /proc {r}/proc && mount --rbind /run/netns {r}/run/netns && "
            f"exec env -i {' '.join(shlex.quote(f'{k}={v}') for k, v in env.items())} "
            f"chroot {r} {' '.join(map(shlex.quote, argv))}"
        )
        cmd = ["ip", "netns", "exec", self.host, "sh", "-c", script]
        if background:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        return subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, check=False)

    def cni(
        self,
        command: str,
        conf: dict[str, Any],
        pod: str = "",
        program: str = "pybridge",
        socket: str = "/run/pybridge/none.sock",
    ) -> tuple[int, Any, bytes]:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": "c1",
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": f"/run/netns/{pod}" if pod else "",
            "CNI_PATH": "/opt/cni/bin",
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYBRIDGE_AGENT_SOCKET": socket,
        }
        proc = self.chroot([f"/opt/cni/bin/{program}"], env, json.dumps(conf).encode())
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc.stderr

    def new_pod(self) -> str:
        pod = new_netns("bpod")
        self.pods.append(pod)
        return pod

    def destroy(self) -> None:
        for pod in self.pods:
            delete_netns(pod)
        delete_netns(self.host)


@pytest.fixture
def node(node_root: Path) -> Iterator[Node]:
    n = Node(node_root)
    try:
        yield n
    finally:
        n.destroy()


def conf(data_dir: str, source_check: bool = False) -> dict[str, Any]:
    """The minbase root has no nft, which the source check needs (kind's nodes may lack it too:
    there the agent, whose image has nft, serves the call); tests/netns covers the check."""
    return {
        "cniVersion": "1.1.0",
        "name": "bundlenet",
        "type": "pybridge",
        "bridge": "br-bundle",
        "isGateway": True,
        "sourceCheck": source_check,
        "ipam": {"type": "pyipam", "dataDir": data_dir, "ranges": [[{"subnet": SUBNET}]]},
    }


def test_root_has_no_python(node_root: Path) -> None:
    assert rootfs.has_python(node_root) == []
    proc = subprocess.run(
        ["chroot", str(node_root), "/bin/sh", "-c", "command -v python3 python"],
        capture_output=True,
        check=False,
    )
    assert proc.returncode != 0 and proc.stdout == b""


def test_installed_as_symlinks_into_a_versioned_bundle(node_root: Path) -> None:
    """The runtime execs the compiled client; its fallback, <store>/current, is the bundle."""
    current = node_root / "opt/pybridge/current"
    assert current.is_symlink()
    for program in ("pybridge", "pyipam"):
        link = node_root / "opt/cni/bin" / program
        assert link.is_symlink()
        target = os.readlink(link)
        assert target == f"/opt/pybridge/{os.readlink(current)}/cni-client"
        assert (node_root / target.lstrip("/")).is_file()
        assert (current / program).exists()


def test_version_add_check_del_inside_the_chroot(node: Node) -> None:
    for program in ("pybridge", "pyipam"):
        rc, out, err = node.cni("VERSION", {"cniVersion": "1.1.0"}, program=program)
        assert rc == 0, err
        assert "1.1.0" in out["supportedVersions"]

    pod = node.new_pod()
    data_dir = f"/var/lib/pybridge-test/{node.host}"
    store = node.root / data_dir.lstrip("/") / "bundlenet"
    # Without nft the source check cannot be set up: a clear error, and nothing reserved.
    rc, out, err = node.cni("ADD", conf(data_dir, source_check=True), pod)
    assert (rc, out["code"], out["msg"]) == (1, 121, "sourceCheck needs nft"), (out, err)
    assert not list(store.glob("10.*"))
    c = conf(data_dir)
    rc, result, err = node.cni("ADD", c, pod)
    assert rc == 0, (result, err)
    ip = result["ips"][0]["address"]
    assert ip.startswith("10.89.0.")
    addrs = json.loads(sh("ip", "netns", "exec", pod, "ip", "-j", "addr", "show", "eth0").stdout)
    assert ip in [f"{a['local']}/{a['prefixlen']}" for a in addrs[0]["addr_info"]]
    assert (store / ip.split("/")[0]).exists()
    # the pod reaches its gateway on the bridge the chrooted plugin made in the host netns
    assert (
        sh(
            "ip", "netns", "exec", pod, BUSYBOX, "ping", "-c", "1", "-W", "2", "10.89.0.1", check=False
        ).returncode
        == 0
    )

    rc, out, err = node.cni("CHECK", {**c, "prevResult": result}, pod)
    assert rc == 0, (out, err)

    rc, out, err = node.cni("DEL", {**c, "prevResult": result}, pod)
    assert rc == 0, (out, err)
    assert sh("ip", "netns", "exec", pod, "ip", "link", "show", "eth0", check=False).returncode != 0
    assert not (store / ip.split("/")[0]).exists()


def test_bundle_agent_serves_forwarded_calls(node: Node) -> None:
    """`pybridge agent` from the same bundle: the exec'd bundle forwards to it."""
    sock = f"/run/pybridge/{node.host}.sock"
    (node.root / "run/pybridge").mkdir(parents=True, exist_ok=True)
    agent_log = f"/var/log/{node.host}-agent.log"
    (node.root / "var/log").mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYBRIDGE_LOG_FILE": agent_log}
    agent = node.chroot(["/opt/cni/bin/pybridge", "agent", sock], env, background=True)
    try:
        deadline = time.monotonic() + 30
        while not (node.root / sock.lstrip("/")).exists():
            assert agent.poll() is None, agent.stdout.read() if agent.stdout else b""
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.05)
        assert (node.root / agent_log.lstrip("/")).exists()  # the agent's own log, made at start
        pod = node.new_pod()
        c = conf(f"/var/lib/pybridge-test/{node.host}")
        rc, result, err = node.cni("ADD", c, pod, socket=sock)
        assert rc == 0, (result, err)
        # The agent served it: a call without a logFile of its own is logged into the agent's.
        calls = [json.loads(line) for line in (node.root / agent_log.lstrip("/")).read_text().splitlines()]
        assert [(e["event"], e["verb"], e["code"]) for e in calls] == [("cni_call", "ADD", 0)]
        # The agent owns the call: stopping it now, DEL falls back to the bundle in-process.
        agent.terminate()
        assert agent.wait(timeout=30) == 0
        rc, out, err = node.cni("DEL", {**c, "prevResult": result}, pod, socket=sock)
        assert rc == 0, (out, err)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=30)
