"""A throw-away Kubernetes-like node: a private containerd whose CRI plugin calls pybridge.

Everything lives in namespaces made here and dies with them:

- a "node" netns (`pbt-<run>-node-*`): containerd runs in it (`nsenter --net`, not `ip netns exec`,
  which remounts /sys and hides the cgroup mounts runc needs), so the plugins it execs put the
  bridge, veths, routes and nftables/iptables rules there, never in the machine's own netns;
- an "outside" netns (`pbt-<run>-out-*`) wired to the node by a veth, standing for the world beyond
  the node (masquerade, hostPort);
- a persistent private mount namespace (a bind-mounted nsfs file under the node's temp root)
  for containerd, its shims and every `ctr` call: there /run/containerd, /var/lib/cni (libcni's
  result cache, not configurable in containerd 1.6), /etc/cni/net.d and /opt/cni/bin (which
  `ctr run --cni` hard-codes) are bind mounts of directories under the temp root, and the
  overlay, shm and netns-pin mounts containerd makes vanish with the namespace.

The host only ever sees the empty mount points, created if missing and removed again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from scripts import sid
from testbed import containerd2, oci

from .cri import CRIClient
from .harness import RUN_MARK

PREFIX = "pbt-"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
BUSYBOX_IMAGE = "pbt.local/busybox:1"
PAUSE_IMAGE = "pbt.local/pause:1"
K8S_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin

NETWORK, BRIDGE, SUBNET = "pbt-e2e", "pbt-cni0", ipaddress.ip_network("10.77.0.0/24")
GATEWAY = str(SUBNET.network_address + 1)
CTR_NETWORK, CTR_BRIDGE, CTR_SUBNET = "pbt-ctr", "pbt-ctr0", ipaddress.ip_network("10.78.0.0/24")
NODE_UPLINK_IP, OUTSIDE_IP = "192.0.2.1", "192.0.2.2"  # node side / outside side of the uplink veth

# Paths the private mount namespace covers, and the directory under the root it shows there.
PRIVATE_MOUNTS = {
    "/run/containerd": "run-containerd",
    "/var/lib/cni": "var-lib-cni",
    "/etc/cni/net.d": "ctr-net.d",
    "/opt/cni/bin": "bin",
}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(*cmd: str | Path, check: bool = True, timeout: float = 60,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def mount_points() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def missing_tools() -> list[str]:
    return [tool for tool in ("containerd", "ctr", "runc") if shutil.which(tool, path=SYSTEM_PATH) is None]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def conflist(root: Path) -> dict[str, Any]:
    """The node's CNI config, as kindnet would write it: pybridge, then portmap for hostPorts."""
    return {
        "cniVersion": "1.0.0",  # the newest containerd 1.6's libcni and Debian's portmap speak
        "name": NETWORK,
        "plugins": [
            {
                "type": "pybridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "isDefaultGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "logFile": str(root / "cni.log"),
                "ipam": {"type": "pyipam", "dataDir": str(root / "ipam"),
                         "ranges": [[{"subnet": str(SUBNET)}]]},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def ctr_conflist(root: Path) -> dict[str, Any]:
    """What `ctr run --cni` reads from (its hard-coded) /etc/cni/net.d."""
    return {
        "cniVersion": "1.0.0",
        "name": CTR_NETWORK,
        "plugins": [
            {"type": "pybridge", "bridge": CTR_BRIDGE, "isGateway": True, "isDefaultGateway": True,
             "logFile": str(root / "cni.log"),
             "ipam": {"type": "pyipam", "dataDir": str(root / "ipam"),
                      "ranges": [[{"subnet": str(CTR_SUBNET)}]]}},
            {"type": "loopback"},
        ],
    }


@dataclass(frozen=True)
class Runtime:
    """One containerd the tier runs: Debian 12's on PATH (bin_dir None), or an unpacked one whose
    bin_dir goes first on containerd's PATH (so its shim and ctr are the ones found)."""

    version: str  # upstream's, e.g. 1.6.20 or 2.1.9
    bin_dir: Path | None = None
    # The reference plugins a kind node of this runtime carries: kind ships today's with 2.x
    # (Debian 12's portmap 1.1.1 takes no 1.1.0 conflist); tests/e2e installs Debian 12's always.
    plugins: Path = REFERENCE_PLUGINS

    @property
    def id(self) -> str:
        return f"containerd-{self.version}"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def path(self) -> str:
        return f"{self.bin_dir}:{SYSTEM_PATH}" if self.bin_dir else SYSTEM_PATH


def debian_runtime() -> Runtime:
    """Debian 12's /usr/bin/containerd (1.6)."""
    return Runtime(containerd2.version())


def sid_runtime() -> Runtime:
    """containerd 2.x and today's reference plugins from Debian's unstable archive (cached)."""
    bin_dir = containerd2.obtain()
    return Runtime(containerd2.version(bin_dir), bin_dir, sid.reference_plugins())


def containerd_config(root: Path, runtime: Runtime, state: str = "", socket: str = "", bin_dir: str = "",
                      conf_dir: str = "", runc_root: str = "") -> str:
    """A private containerd: everything under `root` unless given (a kind-like node passes the
    paths of its own mount namespace: state in /run/containerd, CNI in /opt/cni/bin, pod netns
    pins in /var/run/netns). The CRI settings are the same for both majors; only their keys moved."""
    socket = socket or f"{root}/containerd.sock"
    paths = {"root": str(root), "state": state or f"{root}/containerd/state", "socket": socket,
             "bin_dir": bin_dir or f"{root}/bin", "conf_dir": conf_dir or f"{root}/net.d",
             "pins": str(not state).lower(), "runc": f'Root = "{runc_root}"' if runc_root else ""}
    common = f"""root = "{root}/containerd/root"
state = "{paths['state']}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/containerd/opt"
"""
    template = _CONFIG_V3 if runtime.major >= 2 else _CONFIG_V2
    runc = shutil.which("runc", path=SYSTEM_PATH) or "runc"
    return template.format(pause=PAUSE_IMAGE, runc_binary=runc, **paths).replace("<common>\n", common)


# containerd 1.6: config version 2, the CRI plugin is io.containerd.grpc.v1.cri.
_CONFIG_V2 = """version = 2
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
<common>
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = {pins}
  disable_apparmor = true
  # No CAP_SYS_RESOURCE here: the sandboxes' oom_score_adj -998 would make runc fail.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin_dir}"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        {runc}
"""

# containerd 2.x: config version 3; the CRI plugin split into io.containerd.cri.v1.images (sandbox
# image, snapshotter) and io.containerd.cri.v1.runtime (CNI with a list of bin dirs, runtimes), the
# streaming server stays in io.containerd.grpc.v1.cri. Debian 12's runc runs the containers (named:
# sid's runc needs a newer glibc). NRI (socket in the host's /var/run/nri) and CDI are off: nothing
# here uses them; the image verifier (the transfer service needs it) looks in a dir of ours, not
# /opt/containerd.
_CONFIG_V3 = """version = 3
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.erofs",
                    "io.containerd.snapshotter.v1.blockfile", "io.containerd.nri.v1.nri"]
<common>
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"
[plugins."io.containerd.cri.v1.runtime"]
  netns_mounts_under_state_dir = {pins}
  disable_apparmor = true
  # No CAP_SYS_RESOURCE here: the sandboxes' oom_score_adj -998 would make runc fail.
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{bin_dir}"]
    conf_dir = "{conf_dir}"
    max_conf_num = 1
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc_binary}"
        SystemdCgroup = false
        {runc}
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.image-verifier.v1.bindir"]
  bin_dir = "{root}/containerd/image-verifier"
"""


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """containerd reloads its conf dir on fsnotify: a half-written file is a reload error."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.rename(path)


@dataclass
class CNICall:
    verb: str
    container_id: str
    ifname: str
    netns: str
    network: str | None
    code: int


@dataclass
class Node:
    root: Path
    runtime: Runtime = field(default_factory=debian_runtime)
    netns: str = ""
    outside: str = ""
    containerd_pid: int | None = None
    created_dirs: list[Path] = field(default_factory=list)
    # Every container's cgroup goes under this parent (not containerd's shared /k8s.io and
    # /default), so teardown removes exactly the cgroups this node made.
    cgroup_parent: str = field(default_factory=lambda: f"/{PREFIX}e2e-{secrets.token_hex(3)}")
    _cri: CRIClient | None = None
    _proc: subprocess.Popen[bytes] | None = None

    # --- paths -----------------------------------------------------------------------------

    @property
    def mntns(self) -> Path:
        return self.root / "ns" / "mnt"

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def env(self) -> dict[str, str]:
        """containerd's environment (passed on to the plugins), as a service manager gives it.
        The agent socket points nowhere, so the launchers serve every call in-process whatever
        runs on this machine."""
        return {"PATH": self.runtime.path, "HOME": "/root",
                "PYBRIDGE_AGENT_SOCKET": str(self.root / "no-agent.sock")}

    @property
    def cri(self) -> CRIClient:
        if self._cri is None:
            self._cri = CRIClient(str(self.socket))
        return self._cri

    # --- running things --------------------------------------------------------------------

    def in_node(self, *cmd: str | Path, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command in the node's netns (the machine's mount namespace)."""
        return sh("nsenter", f"--net=/run/netns/{self.netns}", *cmd, check=check, timeout=timeout)

    def in_outside(self, *cmd: str | Path, check: bool = True,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", f"--net=/run/netns/{self.outside}", *cmd, check=check, timeout=timeout)

    def private(self, *cmd: str | Path) -> list[str]:
        """argv running `cmd` where containerd runs: the node netns and the private mount ns."""
        return ["nsenter", f"--mount={self.mntns}", f"--net=/run/netns/{self.netns}", *map(str, cmd)]

    def ctr(self, *args: str | Path, namespace: str = K8S_NAMESPACE, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh(*self.private("ctr", "-a", self.socket, "-n", namespace, *args),
                  check=check, timeout=timeout, env=self.env)

    def ctr_run(self, name: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm --cni` in the foreground (ctr itself calls CNI ADD, then DEL on exit)."""
        return self.ctr("run", "--rm", "--cni", "--cgroup", f"{self.cgroup_parent}/{name}", BUSYBOX_IMAGE,
                        name, *command, namespace="default", check=check)

    def ctr_run_background(self, name: str, *command: str) -> subprocess.Popen[str]:
        return self.ctr_popen("run", "--rm", "--cni", "--cgroup", f"{self.cgroup_parent}/{name}",
                              BUSYBOX_IMAGE, name, *command)

    def ctr_popen(self, *args: str, namespace: str = "default") -> subprocess.Popen[str]:
        with (self.root / "ctr.log").open("a") as log:
            return subprocess.Popen(self.private("ctr", "-a", self.socket, "-n", namespace, *args),
                                    stdout=log, stderr=subprocess.STDOUT, text=True, env=self.env)

    # --- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        for sub in ("bin", "net.d", "ipam", "runc", "images", "ns", *PRIVATE_MOUNTS.values()):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._make_netns()
        self._install_plugins()
        write_json_atomically(self.root / "net.d" / "10-pbt-e2e.conflist", conflist(self.root))
        write_json_atomically(self.root / "ctr-net.d" / "10-pbt-ctr.conflist", ctr_conflist(self.root))
        (self.root / "config.toml").write_text(containerd_config(self.root, self.runtime,
                                                                 runc_root=f"{self.root}/runc"))
        self._make_mount_namespace()
        self.start_containerd()
        self._import_images()
        wait_for(lambda: self.cri.conditions().get("NetworkReady"), 20, "CRI NetworkReady")

    def _make_netns(self) -> None:
        self.netns = f"{PREFIX}{RUN_MARK}-node-{secrets.token_hex(3)}"
        sh("ip", "netns", "add", self.netns)
        self.outside = f"{PREFIX}{RUN_MARK}-out-{secrets.token_hex(3)}"
        sh("ip", "netns", "add", self.outside)
        uplink = f"{PREFIX}up{secrets.token_hex(2)}"
        self.in_node("ip", "link", "set", "lo", "up")
        self.in_node("ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0",
                     "netns", f"/run/netns/{self.outside}")
        self.in_node("ip", "addr", "add", f"{NODE_UPLINK_IP}/24", "dev", uplink)
        self.in_node("ip", "link", "set", uplink, "up")
        # The outside has no route to the pod subnet: only masquerade lets pods talk to it.
        self.in_outside("ip", "link", "set", "lo", "up")
        self.in_outside("ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        self.in_outside("ip", "link", "set", "eth0", "up")
        # kube-proxy nodes run br_netfilter: bridged frames go through the IP hooks (the netns'
        # own copy of the sysctl), which is what makes hairpin mode matter for Services.
        self.in_node("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")

    def _install_plugins(self) -> None:
        """What `make install` puts in the CNI bin dir (its install step, run by the test venv's
        interpreter instead of a fresh venv's), plus the reference loopback and portmap."""
        sh(sys.executable, "-m", "cni_plugin.install", "--bin-dir", self.root / "bin",
           "--libexec-dir", self.root / "libexec")
        for name in ("loopback", "portmap"):
            (self.root / "bin" / name).symlink_to(REFERENCE_PLUGINS / name)

    def _make_mount_namespace(self) -> None:
        ns_dir = self.root / "ns"
        # The nsfs bind must sit on a private mount, or the kernel refuses it (propagation loop).
        sh("mount", "--bind", ns_dir, ns_dir)
        sh("mount", "--make-private", ns_dir)
        self.mntns.touch()
        for target in PRIVATE_MOUNTS:
            self._ensure_dir(Path(target))
        binds = " && ".join(f"mount --bind {self.root / source} {target}"
                            for target, source in PRIVATE_MOUNTS.items())
        sh("unshare", f"--mount={self.mntns}", "--propagation", "private", "sh", "-c", binds)

    def _ensure_dir(self, path: Path) -> None:
        """mkdir -p, remembering each directory created so teardown removes exactly those."""
        missing = []
        for parent in [path, *path.parents]:
            if parent.exists():
                break
            missing.append(parent)
        for directory in reversed(missing):
            directory.mkdir()
            self.created_dirs.append(directory)

    def _import_images(self) -> None:
        images = self.root / "images"
        layer = oci.rootfs_layer()
        busybox = oci.build(BUSYBOX_IMAGE, images / "busybox.tar", layer=layer)
        pause = oci.build(PAUSE_IMAGE, images / "pause.tar", entrypoint=oci.PAUSE_ENTRYPOINT, layer=layer)
        self.ctr("images", "import", busybox)
        self.ctr("images", "import", pause)
        self.ctr("images", "import", busybox, namespace="default")

    # --- containerd ------------------------------------------------------------------------

    def start_containerd(self) -> None:
        log = (self.root / "containerd.log").open("a")
        proc = subprocess.Popen(self.private("containerd", "--config", self.root / "config.toml"),
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.containerd_pid = proc.pid  # nsenter execs containerd: same pid
        self._proc = proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"containerd exited with {proc.returncode}: {self.containerd_log()}")
            try:
                return bool(self.cri.call("Version", {"version": "v1"}, timeout=2)["runtime_api_version"])
            except Exception:
                return False

        wait_for(answers, 30, "containerd to answer CRI Version")

    def stop_containerd(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        pid, proc = self.containerd_pid, self._proc
        if pid is None or proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout)
        self.containerd_pid = None
        if self._cri is not None:
            self._cri.close()
            self._cri = None

    def containerd_log(self, lines: int = 40) -> str:
        path = self.root / "containerd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # --- observations ----------------------------------------------------------------------

    def cni_calls(self) -> list[CNICall]:
        path = self.root / "cni.log"
        if not path.exists():
            return []
        calls = []
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event") == "cni_call":
                calls.append(CNICall(entry["verb"], entry["container_id"], entry["ifname"], entry["netns"],
                                     entry.get("network"), entry["code"]))
        return calls

    def reservations(self, network: str = NETWORK) -> dict[str, str]:
        """IP -> container id, from the host-local format store."""
        directory = self.root / "ipam" / network
        if not directory.exists():
            return {}
        return {p.name: p.read_bytes().decode().split("\r\n")[0] for p in directory.iterdir()
                if p.name != "lock" and not p.name.startswith("last_reserved_ip")}

    def links(self) -> dict[str, dict[str, Any]]:
        links = json.loads(self.in_node("ip", "-d", "-j", "link", "show").stdout)
        return {link["ifname"]: link for link in links}

    def veths(self) -> set[str]:
        return {name for name, link in self.links().items()
                if link.get("linkinfo", {}).get("info_kind") == "veth" and not name.startswith(PREFIX)}

    def rules_text(self) -> str:
        """Every packet-filter rule of the node netns, nftables and iptables views together."""
        nft = self.in_node("nft", "list", "ruleset").stdout
        ipt = self.in_node("iptables-save", check=False).stdout
        return nft + ipt

    def netns_inode(self) -> int:
        return os.stat(f"/run/netns/{self.netns}").st_ino

    # --- teardown --------------------------------------------------------------------------

    def teardown(self) -> None:
        """Best effort, every step guarded: nothing of ours may survive a failed test."""
        steps = [self._remove_pods, self._remove_containers, self.stop_containerd, self._kill_leftovers,
                 self._drop_mount_namespace, self._delete_netns, self._remove_created_dirs,
                 self._remove_cgroups]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as exc:
                errors.append(f"{step.__name__}: {exc}")
        if not any(m.startswith(str(self.root)) for m in mount_points()):
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise AssertionError("node teardown: " + "; ".join(errors))

    def _alive(self) -> bool:
        return self._proc is not None and self.containerd_pid is not None and self._proc.poll() is None

    def runc_roots(self) -> list[Path]:
        """runc state dirs of this node's containers (one per containerd namespace), seen from here."""
        return [*self.root.joinpath("runc").glob("*"),
                *self.root.joinpath("run-containerd", "runc").glob("*")]

    def _remove_pods(self) -> None:
        """The polite way (CNI DEL included) while containerd answers; the steps after it clean
        up whatever this leaves, so a containerd that died meanwhile is no error here."""
        if not self._alive():
            return
        try:
            pods = self.cri.list_pods()
        except grpc.RpcError:
            return
        for pod in pods:
            with contextlib.suppress(grpc.RpcError):
                self.cri.stop_pod(pod["id"])
            with contextlib.suppress(grpc.RpcError):
                self.cri.remove_pod(pod["id"])

    def _remove_containers(self) -> None:
        if not self._alive():
            return
        for namespace in (K8S_NAMESPACE, "default"):
            tasks = self.ctr("tasks", "ls", "-q", namespace=namespace, check=False).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "-s", "KILL", task, namespace=namespace, check=False)
            for task in tasks:
                self.ctr("tasks", "rm", "-f", task, namespace=namespace, check=False)
            containers = self.ctr("containers", "ls", "-q", namespace=namespace, check=False).stdout.split()
            for container in containers:
                self.ctr("containers", "rm", container, namespace=namespace, check=False)

    def _kill_leftovers(self) -> None:
        """runc containers still in our runc roots, then any process left in our mount namespace
        (shims): found by their runc state and namespace inode, killed by pid."""
        nsfs = os.stat("/proc/self/ns/mnt").st_dev
        if not self.mntns.exists() or self.mntns.stat().st_dev != nsfs:
            return  # the namespace was never made
        for runc_root in self.runc_roots():
            listing = sh(*self.private("runc", "--root", runc_root, "list", "-q"), check=False).stdout.split()
            for container in listing:
                sh(*self.private("runc", "--root", runc_root, "delete", "--force", container), check=False)
        ours = self.mntns.stat().st_ino
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                if pid_dir.joinpath("ns", "mnt").stat().st_ino == ours and int(pid_dir.name) != os.getpid():
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def _drop_mount_namespace(self) -> None:
        """Unmount the nsfs pin and the private bind under it: the namespace, and with it every
        mount containerd made in it, goes away with its last process."""
        for target in (self.mntns, self.root / "ns"):
            if str(target) in mount_points():
                sh("umount", target)

    def _delete_netns(self) -> None:
        for name in (self.netns, self.outside):
            if name:
                sh("ip", "netns", "del", name, check=False)

    def _remove_cgroups(self) -> None:
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            ours = hierarchy / self.cgroup_parent.lstrip("/")
            if ours.is_dir():
                for directory, _, _ in sorted(os.walk(ours), key=lambda entry: -len(entry[0])):
                    Path(directory).rmdir()  # a cgroup dir goes with rmdir, its files with it

    def _remove_created_dirs(self) -> None:
        for directory in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()


@dataclass
class Pod:
    id: str
    name: str
    config: dict[str, Any]
    ip: str
    containers: dict[str, str] = field(default_factory=dict)


def sandbox_config(name: str, cgroup_parent: str, port_mappings: list[dict[str, Any]] | None = None,
                   host_network: bool = False) -> dict[str, Any]:
    """A PodSandboxConfig the way kubelet builds it (the fields containerd's CRI reads)."""
    return {
        "metadata": {"name": name, "uid": secrets.token_hex(8), "namespace": "pbt", "attempt": 0},
        "hostname": "" if host_network else name,  # kubelet leaves the node's own hostname
        "port_mappings": port_mappings or [],
        "linux": {"cgroup_parent": cgroup_parent,
                  "security_context": {"namespace_options": {"network": "NODE" if host_network else "POD"}}},
    }


class Pods:
    """The pods of one test, removed after it (Stop, then Remove, as kubelet does)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.live: dict[str, Pod] = {}

    def run(self, name: str, containers: dict[str, list[str]] | None = None,
            port_mappings: list[dict[str, Any]] | None = None, host_network: bool = False) -> Pod:
        config = sandbox_config(name, self.node.cgroup_parent, port_mappings, host_network)
        pod_id = self.node.cri.run_pod(config)
        status = self.node.cri.pod_status(pod_id)
        pod = Pod(pod_id, name, config, status["network"]["ip"])
        self.live[pod_id] = pod
        for container, command in (containers or {}).items():
            cid = self.node.cri.create_container(pod_id, config, container, BUSYBOX_IMAGE, command)
            self.node.cri.start_container(cid)
            pod.containers[container] = cid
        return pod

    def exec(self, pod: Pod, *cmd: str, container: str | None = None, timeout: int = 20) -> tuple[int, str]:
        cid = pod.containers[container] if container else next(iter(pod.containers.values()))
        rc, out, err = self.node.cri.exec_sync(cid, *cmd, timeout=timeout)
        return rc, out + err

    def try_get(self, pod: Pod, address: str, port: int, container: str | None = None) -> str | None:
        """One HTTP GET from inside the pod; the body, or None. busybox nc, not wget: the static
        busybox's wget crashes (SIGSEGV) in glibc's resolver, even on a numeric address."""
        request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}"
        rc, output = self.exec(pod, "/bin/sh", "-c", request, container=container)
        head, sep, body = output.partition("\r\n\r\n")
        return body if rc == 0 and sep and head.startswith("HTTP/1.") else None

    def http_get(self, pod: Pod, address: str, port: int, container: str | None = None,
                 timeout: float = 15) -> str:
        """GET / from inside the pod, retried while the server comes up; returns the body."""
        body = wait_for(lambda: self.try_get(pod, address, port, container), timeout,
                        f"GET http://{address}:{port}/ from {pod.name}", interval=0.2)
        return str(body).strip()

    def remove(self, pod: Pod) -> None:
        self.node.cri.stop_pod(pod.id)
        self.node.cri.remove_pod(pod.id)
        self.live.pop(pod.id, None)

    def remove_all(self) -> None:
        for pod in list(self.live.values()):
            self.remove(pod)


def http_server(port: int, body: str, address: str = "") -> list[str]:
    """A busybox httpd serving `body` at / on [address:]port, in the foreground."""
    listen = f"{address}:{port}" if address else str(port)
    script = f"mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p {listen} -h /www"
    return ["/bin/sh", "-c", script]


SLEEPER = ["/bin/sleep", "3600"]


def http_get_in(netns: str, address: str, port: int, timeout: float = 15) -> str:
    """GET / from a netns of ours with the test's own Python, retried while it fails."""
    code = ("import urllib.request\n"
            f"print(urllib.request.urlopen('http://{address}:{port}/', timeout=2).read().decode())")

    def attempt() -> str | None:
        proc = sh("nsenter", f"--net=/run/netns/{netns}", sys.executable, "-I", "-c", code, check=False)
        return proc.stdout if proc.returncode == 0 else None

    return str(wait_for(attempt, timeout, f"GET http://{address}:{port}/ in {netns}", interval=0.2)).strip()


def mentions(text: str, ip: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(ip)}(?![\d])", text) is not None
