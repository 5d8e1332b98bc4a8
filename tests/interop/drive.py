"""The Go side of the interop tier: build the libcni driver and the go-cni test offline, run them.

Both are built in GOPATH mode against Debian's golang-github-appc-cni-dev (libcni 1.1.2) and
golang-github-containerd-go-cni-dev (go-cni 1.1.7) from /usr/share/gocode, into a tmp dir: no
module download, no binary in the tree. `make cnitool` runs the same `go build`. golang.py builds
the driver against today's libcni from Debian's unstable archive as well.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni_plugin import masq
from testbed.harness import REFERENCE_PLUGINS, Host, Reply, pod_json

HERE = Path(__file__).resolve().parent
GOCODE = Path("/usr/share/gocode")
LIBCNI = GOCODE / "src/github.com/containernetworking/cni/libcni"
GOCNI = GOCODE / "src/github.com/containerd/go-cni"
APT_PACKAGES = "golang-go golang-github-appc-cni-dev golang-github-containerd-go-cni-dev"


def missing_toolchain() -> str | None:
    """Why the Go tier cannot run here, or None."""
    if shutil.which("go") is None:
        return f"no Go toolchain (apt-get install {APT_PACKAGES})"
    for path, package in ((LIBCNI, "golang-github-appc-cni-dev"),
                          (GOCNI, "golang-github-containerd-go-cni-dev")):
        if not path.is_dir():
            return f"{path} missing (apt-get install {package})"
    return None


def go_env(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{work / 'gopath'}:{GOCODE}",
        "GOCACHE": str(work / "gocache"),
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }


@dataclass(frozen=True)
class GoTools:
    cnidrive: Path
    gocni_test: Path


def build(work: Path) -> GoTools:
    """Build the driver and compile the go-cni test binary (about 1-3 s with a cold cache)."""
    env = go_env(work)
    tools = GoTools(cnidrive=work / "cnidrive", gocni_test=work / "gocni.test")
    for cmd, cwd in (
        (["go", "build", "-o", str(tools.cnidrive), "."], HERE / "cnidrive"),
        (["go", "test", "-c", "-o", str(tools.gocni_test), "."], HERE / "gocni"),
    ):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {cwd} failed:\n{proc.stdout}{proc.stderr}")
    return tools


@dataclass
class Libcni:
    """cnidrive (libcni) run inside a throw-away host netns, with its own conf and cache dirs; the
    plugins from the host's bin dir, then the reference plugins of `reference`."""

    host: Host
    binary: Path
    conf_dir: Path
    cache_dir: Path
    reference: Path = Path(REFERENCE_PLUGINS)

    @property
    def cni_path(self) -> str:
        return f"{self.host.bin_dir}:{self.reference}"

    def env(self) -> list[str]:
        """The plugins' environment (libcni passes its own on): the test's agent socket, never
        the machine's default one."""
        return [f"PATH={os.environ['PATH']}", f"PYBRIDGE_AGENT_SOCKET={self.host.agent_socket}"]

    def write(self, conflist: dict[str, Any], file: str | None = None) -> str:
        """Write the conflist atomically (as runtimes want it). Returns the network name to look
        up in the conf dir, or with `file` (several lists of one network) the file's path."""
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        name = str(conflist["name"])
        path = self.conf_dir / (file or f"10-{name}.conflist")
        tmp = self.conf_dir / f".{path.name}.tmp"
        tmp.write_text(json.dumps(conflist, indent=1))
        tmp.rename(path)
        return str(path) if file else name

    def run(
        self,
        command: str,
        network: str,
        pod: str | None = None,
        container_id: str = "c1",
        ifname: str = "eth0",
        cap: dict[str, Any] | None = None,
        args: str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=interop;K8S_POD_NAME=p",
        valid: list[dict[str, str]] | None = None,
    ) -> Reply:
        argv = [str(self.binary), "-confdir", str(self.conf_dir), "-cache-dir", str(self.cache_dir),
                "-cni-path", self.cni_path, "-id", container_id, "-ifname", ifname, "-args", args]
        if cap is not None:
            argv += ["-cap", json.dumps(cap)]
        if valid is not None:  # gc's valid attachments (a driver built with -tags spec110)
            argv += ["-valid", json.dumps(valid)]
        argv += [command, network, f"/run/netns/{pod}" if pod else ""]
        proc = self.host.exec("env", "-i", *self.env(), *argv, check=False)
        text = proc.stdout.strip()
        out = json.loads(text) if text else None
        return Reply(proc.returncode, out, proc.stdout, proc.stderr)

    def ok(self, command: str, network: str, pod: str | None = None, **kw: Any) -> Any:
        reply = self.run(command, network, pod, **kw)
        assert reply.ok, f"libcni {command} failed: {reply.stderr.decode()} {reply.stdout!r}"
        return reply.out

    def cache_files(self) -> list[str]:
        results = self.cache_dir / "results"
        return sorted(p.name for p in results.iterdir()) if results.exists() else []


def conflist(host: Host, name: str, version: str, *chained: dict[str, Any], subnet: str = "10.66.0.0/24",
             **plugin: Any) -> dict[str, Any]:
    """A conflist whose first plugin is pybridge with pyipam (override with `type`, `ipam`...)."""
    first: dict[str, Any] = {
        "type": "pybridge",
        "bridge": "br-interop",
        "isGateway": True,
        "isDefaultGateway": True,
        "ipam": {"type": "pyipam", "dataDir": str(host.data_dir), "ranges": [[{"subnet": subnet}]]},
    }
    first.update(plugin)
    return {"cniVersion": version, "name": name, "plugins": [first, *chained]}


def raw_call(host: Host, command: str, conf: dict[str, Any], plugin: str = "pybridge") -> Reply:
    """A verb with only CNI_COMMAND and CNI_PATH set, as the spec has GC and STATUS called (libcni
    >= 1.2 does it this way; 1.1.2 cannot)."""
    binary = host.bin_dir / plugin
    if not binary.exists():
        binary = Path(REFERENCE_PLUGINS) / plugin
    env = [f"PATH={os.environ['PATH']}", f"CNI_COMMAND={command}",
           f"CNI_PATH={host.bin_dir}:{REFERENCE_PLUGINS}", f"PYBRIDGE_AGENT_SOCKET={host.agent_socket}"]
    proc = host.exec("env", "-i", *env, str(binary), check=False, input=json.dumps(conf).encode())
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return Reply(proc.returncode, out, proc.stdout, proc.stderr)


def kernel_matches(host: Host, pod: str, result: dict[str, Any]) -> None:
    """What libcni returned and cached is what is on the links."""
    bridge, veth, eth0 = result["interfaces"]
    assert eth0["sandbox"] == f"/run/netns/{pod}"
    pod_link = pod_json(host, pod, "addr", "show", "eth0")[0]
    assert pod_link["address"] == eth0["mac"]
    on_link = {f"{a['local']}/{a['prefixlen']}" for a in pod_link["addr_info"] if a["scope"] == "global"}
    assert on_link == {ip["address"] for ip in result["ips"]}
    links = host.links()
    assert links[veth["name"]]["master"] == bridge["name"]
    assert links[veth["name"]]["address"] == veth["mac"]
    assert links[bridge["name"]]["address"] == bridge["mac"]
    gateway = result["ips"][0]["gateway"]
    assert pod_json(host, pod, "route", "show", "default")[0]["gateway"] == gateway
    assert {"dst": "0.0.0.0/0", "gw": gateway} in result["routes"]


def has_nat_rules(host: Host, network: str, cid: str) -> bool:
    """Whether the host netns holds the masquerade rules of (network, cid, eth0), in nftables or
    iptables (legacy or nft) alike."""
    text = "\n".join(host.exec(*cmd, check=False).stdout.decode() for cmd in (
        ("nft", "list", "ruleset"), ("iptables-save", "-t", "nat"), ("ip6tables-save", "-t", "nat")))
    return masq.attachment_tag(network, cid, "eth0") in text or masq._chain(network, cid, "eth0") in text
