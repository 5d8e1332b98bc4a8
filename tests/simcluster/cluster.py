"""kind without docker: a throw-away world, three nodes from kind-config.yaml, a fake API server.

- world (world.py, netns `pbt-<run>-ks*-world`): docker's `kind` network with the fake API server on
  172.18.0.1:6443 (HTTPS, a throw-away CA) and an "outside" netns;
- node (netns + persistent private mount namespace, tests/e2e's Node with kind's layout): eth0
  on the world bridge, and /run, /opt, /etc/cni/net.d, /var/lib/cni bound from the node's tree,
  `/` made rshared as on a systemd host (HostToContainer mounts need it); its containerd uses
  kind's paths (/opt/cni/bin, /etc/cni/net.d, pod netns pins in /var/run/netns) and imports the
  pybridge image, a pause image and busybox;
- kubelet (kubelet.py) per node, the API's Node object per node (podCIDRs from podSubnet).

Dual-stack, as deploy/kind-config-dualstack.yaml: each node has an IPv4 and an IPv6 address and
podCIDR, each pod an IPv4 and an IPv6 address (`Pod.ip` the IPv4 one, `Pod.ips` both).

`Cluster` is the fixture other test modules use: `add_node`, `deploy(node)` (the DaemonSet pod),
`run_pod(node, name, containers, labels)`, `exec(pod, ...)`, `delete_pod`, `remove_node`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed import oci
from testbed.node import (
    BUSYBOX_IMAGE,
    PAUSE_IMAGE,
    Node,
    Runtime,
    containerd_config,
    debian_runtime,
    sh,
    wait_for,
)

from ..fakeapi.apiserver import ApiServer, NodeStore
from .image import REPO, Images
from .kubelet import Kubelet, Pod, write_service_account
from .workloads import http_body, http_get_script, service_rules
from .world import API_PORT, GATEWAY, World, listen_in_netns, make_pki

MANIFEST = REPO / "deploy" / "pybridge.yaml"
KIND_CONFIG = REPO / "deploy" / "kind-config-dualstack.yaml"  # pods get an IPv4 and an IPv6 address
CLUSTER = "pybridge"  # kind's default node names: <cluster>-control-plane, <cluster>-worker, -worker2
# node path -> directory of the node's tree that the node's mount namespace shows there
NODE_MOUNTS = {"/run": "run", "/opt": "opt", "/etc/cni/net.d": "etc-cni-net.d", "/var/lib/cni": "var-lib-cni"}


def kind_config(path: Path = KIND_CONFIG) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def daemonset(path: Path = MANIFEST) -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "DaemonSet")


def node_names(config: dict[str, Any]) -> list[str]:
    """kind's naming: one control plane `<cluster>-control-plane`, workers `-worker`, `-worker2`..."""
    names, workers = [], 0
    for node in config["nodes"]:
        if node["role"] == "control-plane":
            names.append(f"{CLUSTER}-control-plane")
        else:
            workers += 1
            names.append(f"{CLUSTER}-worker{workers if workers > 1 else ''}")
    return names


@dataclass
class KindNode(Node):
    """tests/e2e's Node with a kind node's layout: real paths inside its own mount namespace."""

    name: str = ""
    ip: str = ""
    ip6: str = ""

    @property
    def socket(self) -> Path:
        return self.root / "run" / "containerd" / "containerd.sock"

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": self.runtime.path, "HOME": "/root"}

    def node_path(self, path: str) -> Path:
        """Where this process sees the node's `path` (only paths inside the node's own tree, and
        /proc/sys/net: procfs is the kernel's, the same in every mount namespace, and each file
        below net/ is the netns' of the thread that opens it)."""
        path = os.path.normpath(
            path.replace("/var/run/", "/run/", 1) if path.startswith("/var/run/") else path
        )
        if path == "/proc/sys/net" or path.startswith("/proc/sys/net/"):
            return Path(path)
        for target, source in NODE_MOUNTS.items():
            if path == target or path.startswith(target + "/"):
                return self.root / source / os.path.relpath(path, target)
        raise AssertionError(f"{path} is outside the node's private tree ({sorted(NODE_MOUNTS)})")

    def runc_roots(self) -> list[Path]:
        return list(self.node_path("/run/containerd/runc").glob("*"))

    def setup_kind(self, world: World, index: int, images: Images) -> None:
        for sub in ("ns", "logs", "images", *NODE_MOUNTS.values()):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("/run/netns", "/run/containerd", "/opt/cni/bin"):
            self.node_path(sub).mkdir(parents=True, exist_ok=True)
        for plugin in ("loopback", "portmap", "bridge", "host-local"):  # kind's node image ships these
            self.node_path(f"/opt/cni/bin/{plugin}").symlink_to(self.runtime.plugins / plugin)
        self.netns = f"{world.netns.removesuffix('-world')}-n{index}"
        sh("ip", "netns", "add", self.netns)
        self.ip, self.ip6 = world.attach(self.netns, index)
        self.in_node("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", check=False)
        (self.root / "config.toml").write_text(
            containerd_config(
                self.root,
                self.runtime,
                state="/run/containerd",
                socket="/run/containerd/containerd.sock",
                bin_dir="/opt/cni/bin",
                conf_dir="/etc/cni/net.d",
            )
        )
        self._make_kind_mount_namespace()
        self.start_containerd()
        for archive in (images.product, images.upgrade, images.dnsmasq, *self._test_images()):
            self.ctr("images", "import", archive, timeout=180)

    def _make_kind_mount_namespace(self) -> None:
        ns_dir = self.root / "ns"
        sh("mount", "--bind", ns_dir, ns_dir)  # the nsfs pin must sit on a private mount
        sh("mount", "--make-private", ns_dir)
        self.mntns.touch()
        binds = " && ".join(
            f"mount --bind {self.root / source} {target}" for target, source in NODE_MOUNTS.items()
        )
        sh(
            "unshare",
            f"--mount={self.mntns}",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"{binds} && mount --make-rshared /",
        )

    def _test_images(self) -> list[Path]:
        layer = oci.rootfs_layer()
        return [
            oci.build(BUSYBOX_IMAGE, self.root / "images" / "busybox.tar", layer=layer),
            oci.build(
                PAUSE_IMAGE, self.root / "images" / "pause.tar", entrypoint=oci.PAUSE_ENTRYPOINT, layer=layer
            ),
        ]

    def runtime_version(self) -> str:
        """What kubelet reports as status.nodeInfo.containerRuntimeVersion."""
        version = self.cri.call("Version", {"version": "v1"})
        return f"{version['runtime_name']}://{version['runtime_version']}"

    def routes(self, family: int = 4) -> set[tuple[str, str]]:
        out = json.loads(self.in_node("ip", f"-{family}", "-j", "route", "show", "proto", "91").stdout)
        return {(r["dst"], r["gateway"]) for r in out}

    def conflist(self) -> dict[str, Any] | None:
        path = self.node_path("/etc/cni/net.d/10-pybridge.conflist")
        return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Cluster:
    images: Images
    root: Path
    runtime: Runtime = field(default_factory=debian_runtime)  # every node's containerd
    world: World = field(default_factory=World)
    store: NodeStore | None = None
    api: ApiServer | None = None
    nodes: dict[str, KindNode] = field(default_factory=dict)
    kubelets: dict[str, Kubelet] = field(default_factory=dict)
    daemon_pods: dict[str, Pod] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    config: dict[str, Any] = field(default_factory=kind_config)
    started: int = 0  # nodes ever added: each gets the next address
    mount_points: list[Path] = field(default_factory=list)  # made on the host for the nodes' binds
    services: list[tuple[str, str, int, str, int]] = field(default_factory=list)
    mount_namespaces: set[int] = field(default_factory=set)  # every node's, for the leftover check

    # --- world and API ------------------------------------------------------------------------

    def up(self) -> None:
        for target in NODE_MOUNTS:  # shared by every node, removed after the last one
            missing = [p for p in [Path(target), *Path(target).parents] if not p.exists()]
            for directory in reversed(missing):
                directory.mkdir()
                self.mount_points.insert(0, directory)
        self.world.up(self.tag)
        self.store = NodeStore(self.config["networking"]["podSubnet"])
        ca, crt, key = make_pki(self.root / "pki", GATEWAY)
        self.sa_dir = write_service_account(self.root / "sa", self.token, ca.read_bytes())
        self.api = ApiServer(
            self.store, listen_in_netns(self.world.netns, GATEWAY, API_PORT), crt, key, self.token
        )
        for namespace in ("default", "kube-system"):
            self.add_namespace(namespace)

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create or relabel a Namespace; the API server adds kubernetes.io/metadata.name itself."""
        assert self.store is not None
        labels = {**(labels or {}), "kubernetes.io/metadata.name": name}
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        self.store.put("namespaces", namespace)

    # --- nodes --------------------------------------------------------------------------------

    def add_node(self, name: str) -> KindNode:
        return self.add_nodes([name])[0]

    def add_nodes(self, names: list[str]) -> list[KindNode]:
        """Nodes set up side by side (containerd start and image imports dominate), then given a
        kubelet and registered in the API in the order given."""
        nodes = []
        for name in names:
            self.started += 1
            self.nodes[name] = KindNode(root=self.root / name, runtime=self.runtime, name=name)
            nodes.append((self.nodes[name], self.started))
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for done in [
                pool.submit(node.setup_kind, self.world, index, self.images) for node, index in nodes
            ]:
                done.result()
        for node, _ in nodes:
            self.mount_namespaces.add(node.mntns.stat().st_ino)
            self.kubelets[node.name] = Kubelet(
                node_name=node.name,
                node_ip=node.ip,
                node_ip6=node.ip6,
                cri=node.cri,
                cgroup_parent=node.cgroup_parent,
                log_root=node.root / "logs",
                sa_dir=self.sa_dir,
                api_host=GATEWAY,
                api_port=API_PORT,
                node_path=node.node_path,
                store=self.store,
            )
            self.register(node.name)
        return [node for node, _ in nodes]

    def register(self, name: str) -> None:
        assert self.store is not None
        node = self.nodes[name]
        self.store.add(name, [node.ip, node.ip6], node.runtime_version())

    def pod_cidr(self, name: str, family: int = 4) -> str:
        assert self.store is not None
        cidrs = self.store.nodes[name]["spec"]["podCIDRs"]
        return str(next(c for c in cidrs if (":" in c) == (family == 6)))

    def remove_node(self, name: str) -> None:
        """The node leaves the API (kubectl delete node), its machine goes away."""
        assert self.store is not None
        self.store.delete(name)
        node = self.nodes.pop(name)
        for pod in self.kubelets.pop(name).pods.values():  # the pod garbage collector's part
            self.store.remove("pods", f"{pod.namespace}/{pod.name}")
        self.daemon_pods.pop(name, None)
        node.teardown()

    # --- the DaemonSet ------------------------------------------------------------------------

    def deploy(
        self, name: str, manifest: Path = MANIFEST, edit: Callable[[dict[str, Any]], None] | None = None
    ) -> Pod:
        """The DaemonSet's pod on node `name`; `edit` may change the parsed pod template first."""
        template = daemonset(manifest)["spec"]["template"]
        if edit is not None:
            edit(template)
        pod = self.kubelets[name].run_pod(
            f"pybridge-{secrets.token_hex(3)}",
            template["spec"],
            namespace="kube-system",
            labels=template["metadata"]["labels"],
        )
        self.daemon_pods[name] = pod
        return pod

    def ready(self, name: str) -> bool:
        """The node counts as ready for pods: conflist written, agent socket accepting."""
        node = self.nodes[name]
        if node.conflist() is None:
            return False
        with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
            try:
                s.connect(str(node.node_path("/run/pybridge/agent.sock")))
            except OSError:
                return False
        return True

    def wait_ready(self, names: list[str] | None = None, timeout: float = 60) -> None:
        for name in names or list(self.nodes):
            try:
                wait_for(lambda n=name: self.ready(n), timeout, f"{name} ready (conflist + agent)")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.daemon_logs(name)}") from None

    def daemon_logs(self, name: str, lines: int = 15) -> str:
        pod = self.daemon_pods.get(name)
        if pod is None:
            return f"{name}: no DaemonSet pod"
        return "\n".join(
            f"--- {name}/{c}:\n" + "\n".join(pod.log(c).splitlines()[-lines:])
            for c in dict.fromkeys(("install", *pod.containers))
        )

    # --- workloads ----------------------------------------------------------------------------

    def run_pod(
        self,
        node: str,
        name: str,
        containers: dict[str, list[str]] | None = None,
        labels: dict[str, str] | None = None,
        image: str = BUSYBOX_IMAGE,
        extra: dict[str, dict[str, Any]] | None = None,
        dns: dict[str, list[str]] | None = None,
        namespace: str = "default",
    ) -> Pod:
        """A pod of busybox containers (name -> command); `extra` adds fields per container."""
        spec = {
            "containers": [
                {"name": c, "image": image, "command": cmd, **(extra or {}).get(c, {})}
                for c, cmd in (containers or {"main": ["sleep", "3600"]}).items()
            ]
        }
        return self.kubelets[node].run_pod(name, spec, namespace=namespace, labels=labels, dns=dns)

    def relabel_pod(self, pod: Pod, labels: dict[str, str]) -> None:
        """kubectl label --overwrite: the API object changes, the running pod does not."""
        pod.labels = dict(labels)
        self.kubelets[pod.node].post(pod)

    def pods(self, **labels: str) -> list[Pod]:
        """The running pods (DaemonSet pods included) whose labels include `labels`."""
        return [
            pod
            for kubelet in self.kubelets.values()
            for pod in kubelet.pods.values()
            if labels.items() <= pod.labels.items()
        ]

    def exec(self, pod: Pod, *cmd: str, container: str | None = None, timeout: int = 20) -> tuple[int, str]:
        return self.kubelets[pod.node].exec(pod, *cmd, container=container, timeout=timeout)

    def delete_pod(self, pod: Pod) -> None:
        self.kubelets[pod.node].delete_pod(pod)

    def http_get(
        self,
        pod: Pod,
        address: str,
        port: int,
        path: str = "/cgi-bin/ip",
        container: str | None = None,
        timeout: float = 15,
    ) -> str:
        """GET from inside the pod, retried while the server comes up; the body."""

        def attempt() -> str | None:
            _, out = self.exec(
                pod, "/bin/sh", "-c", http_get_script(address, port, path), container=container
            )
            return http_body(out)

        return str(wait_for(attempt, timeout, f"GET http://{address}:{port}{path} from {pod.name}", 0.3))

    def add_service(
        self, vip: str, port: int, endpoint: Pod, endpoint_port: int, protocols: tuple[str, ...] = ("tcp",)
    ) -> None:
        """A ClusterIP Service with one endpoint, programmed on every node as kube-proxy would."""
        self.services += [(proto, vip, port, endpoint.ip, endpoint_port) for proto in protocols]
        self._program_services()

    def _program_services(self) -> None:
        for node in self.nodes.values():
            rules = node.root / "kube-proxy.nft"
            rules.write_text(service_rules(self.services))
            node.in_node("nft", "-f", rules)

    def in_outside(
        self, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", f"--net=/run/netns/{self.world.outside}", *cmd, check=check, timeout=timeout)

    # --- teardown -----------------------------------------------------------------------------

    def down(self) -> None:
        errors = []
        for node in reversed(list(self.nodes.values())):
            try:
                node.teardown()
            except AssertionError as exc:
                errors.append(str(exc))
        if self.api is not None:
            self.api.close()
        self.world.down()
        for directory in self.mount_points:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if errors:
            raise AssertionError("; ".join(errors))
