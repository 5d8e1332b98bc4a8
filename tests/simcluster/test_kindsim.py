"""kind-sim: the image, the DaemonSet and pods on three nodes made of real parts (docs/kubernetes.md)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cni_plugin.node.bundle import bundle_digest
from testbed.node import BUSYBOX_IMAGE, wait_for

from .cluster import Cluster
from .kubelet import Pod
from .workloads import WHOAMI, http_body, http_get_script
from .world import OUTSIDE_IP

HAIRPIN_VIP, DNS_VIP = "10.71.0.20", "10.71.0.10"  # in kind-config.yaml's serviceSubnet
DNSMASQ = [
    "dnsmasq",
    "--keep-in-foreground",
    "--no-resolv",
    "--no-hosts",
    "--user=root",
    "--host-record=web.pbt.test,10.1.2.3",
    "--log-facility=-",
    "--log-queries",
]
REDIRECT = (
    "add table ip mesh; add chain ip mesh out { type nat hook output priority -100; }; "
    "add rule ip mesh out meta skuid != 1337 tcp dport 81 redirect to :15001"
)

pytestmark = pytest.mark.kindsim


def _events(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_daemonset_installs_the_image_bundle_and_writes_the_conflist(cluster: Cluster) -> None:
    for name, node in cluster.nodes.items():
        pod = cluster.daemon_pods[name]
        installed = [e for e in _events(pod.log("install")) if e.get("event") == "installed"]
        assert installed, pod.log("install")
        bundle = node.node_path(str(installed[0]["bundle"]).removeprefix("/host"))
        # what the image's entrypoint runs is what the node got: its digest names the copy
        assert bundle.name == bundle_digest(str(bundle))
        assert node.node_path("/opt/pybridge/current").readlink().name == bundle.name
        for program in ("pybridge", "pyipam"):  # symlinks in the node's own terms
            link = node.node_path(f"/opt/cni/bin/{program}").readlink()
            assert link.parent == Path("/opt/pybridge") / bundle.name, link
        # hostPath types honoured: DirectoryOrCreate made the dirs, FileOrCreate the lock file
        assert node.node_path("/run/xtables.lock").is_file()
        assert node.node_path("/run/cni-ipam-state").is_dir()
        conflist = node.conflist()
        assert conflist is not None
        assert conflist["plugins"][0]["ipam"]["ranges"] == [
            [{"subnet": cluster.pod_cidr(name, family)}] for family in (4, 6)
        ]
        # `auto`: the newest cniVersion the node's runtime takes (libcni 1.1 in containerd 1.6
        # rejects a 1.1.0 result; 2.x takes it and calls STATUS for it)
        assert node.runtime_version().startswith(f"containerd://{node.runtime.version}")  # ~ds1, +ds1
        assert conflist["cniVersion"] == ("1.1.0" if node.runtime.major >= 2 else "1.0.0")
        for family in (4, 6):  # each family's podCIDRs via the node's InternalIP of that family
            others = {
                (cluster.pod_cidr(o, family), n.ip if family == 4 else n.ip6)
                for o, n in cluster.nodes.items()
                if o != name
            }
            assert node.routes(family) == others


@pytest.fixture(scope="module")
def web(cluster: Cluster) -> Iterator[dict[str, Pod]]:
    """A whoami server pod on every node, by node name."""
    pods = {
        name: cluster.run_pod(name, f"web-{i}", {"main": WHOAMI}, labels={"app": "web"})
        for i, name in enumerate(cluster.nodes)
    }
    yield pods
    for pod in pods.values():
        cluster.delete_pod(pod)


@pytest.fixture
def pods(cluster: Cluster) -> Iterator[list[Pod]]:
    made: list[Pod] = []
    yield made
    for pod in made:
        cluster.delete_pod(pod)


def test_pod_addresses_come_from_the_node_podcidr(cluster: Cluster, web: dict[str, Pod]) -> None:
    assert sorted(p.name for p in cluster.pods(app="web")) == sorted(p.name for p in web.values())
    for name, pod in web.items():  # one address of each family (dual-stack), from the node's podCIDRs
        assert [ipaddress.ip_address(ip).version for ip in pod.ips] == [4, 6]
        for ip in pod.ips:
            family = ipaddress.ip_address(ip).version
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(cluster.pod_cidr(name, family))
    assert len({pod.ip for pod in web.values()}) == len(web)


def test_agent_endpoints_where_the_manifest_binds_them(cluster: Cluster, web: dict[str, Pod]) -> None:
    """A pod (Prometheus' place) scrapes the agent's /metrics on the node's address, and the
    ADDs there were the agent's own: unprivileged, it wrote the pod's sysctls through the mounted
    /proc/sys/net (a dual-stack pod's IPv6 on, its DAD off). The probes' health endpoint answers on the
    node's loopback (the kubelet's view) and no pod reaches it."""
    name, pod = next(iter(web.items()))
    node = cluster.nodes[name]
    metrics = cluster.http_get(pod, node.ip, 9430, "/metrics")
    served = {"program": "pybridge", "verb": "ADD", "code": "0"}
    adds = [s.value for family in text_string_to_metric_families(metrics) for s in family.samples
            if s.name == "pybridge_cni_calls_total" and s.labels == served]
    assert adds and adds[0] >= 1, metrics
    for sysctl, value in (("disable_ipv6", "0\n"), ("accept_dad", "0\n")):  # the kernel's defaults: 0, 1
        assert cluster.exec(pod, "cat", f"/proc/sys/net/ipv6/conf/eth0/{sysctl}") == (0, value)
    for port in (9432, 9433):  # the agent's, the node controller's
        probe = node.in_node("/bin/busybox", "sh", "-c", http_get_script("127.0.0.1", port, "/healthz"))
        assert http_body(probe.stdout) == "ok", probe.stdout
        _, out = cluster.exec(pod, "/bin/sh", "-c", http_get_script(node.ip, port, "/healthz"))
        assert http_body(out) is None, out


def test_tcp_same_node_and_across_nodes_keeps_the_source_address(
    cluster: Cluster, web: dict[str, Pod], pods: list[Pod]
) -> None:
    first = next(iter(cluster.nodes))
    client = cluster.run_pod(first, "client")
    pods.append(client)
    for name, server in web.items():
        seen = cluster.http_get(client, server.ip, 80)
        assert seen == client.ip, f"{first} -> {name}: the server saw {seen}, not the pod {client.ip}"


def test_outside_sees_the_node_address_through_masquerade(
    cluster: Cluster, pods: list[Pod], tmp_path: Path
) -> None:
    cgi = tmp_path / "www" / "cgi-bin"
    cgi.mkdir(parents=True)
    (cgi / "ip").write_text("#!/bin/sh\necho Content-Type: text/plain\necho\necho $REMOTE_ADDR\n")
    (cgi / "ip").chmod(0o755)
    server = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{cluster.world.outside}",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            str(tmp_path / "www"),
        ]
    )
    try:
        for name, node in cluster.nodes.items():
            pod = cluster.run_pod(name, "egress")
            pods.append(pod)
            assert cluster.http_get(pod, OUTSIDE_IP, 80) == node.ip
    finally:
        server.kill()
        server.wait(10)


def test_host_port_through_the_chained_portmap(cluster: Cluster, pods: list[Pod]) -> None:
    name, node = list(cluster.nodes.items())[-1]
    pod = cluster.run_pod(
        name,
        "hostport",
        {"main": WHOAMI},
        extra={"main": {"ports": [{"containerPort": 80, "hostPort": 8080}]}},
    )
    pods.append(pod)

    def from_outside() -> str | None:
        out = cluster.in_outside(
            "sh", "-c", http_get_script(node.ip, 8080).replace("nc ", "/bin/busybox nc ", 1), check=False
        )
        return http_body(out.stdout)

    assert wait_for(from_outside, 15, f"outside -> {node.ip}:8080") == OUTSIDE_IP


def test_pod_reaches_itself_through_a_service_address(cluster: Cluster, web: dict[str, Pod]) -> None:
    pod = next(iter(web.values()))
    cluster.add_service(HAIRPIN_VIP, 80, pod, 80)
    # the reply must come back out of the port it arrived on: hairpin mode on the pod's veth
    assert cluster.http_get(pod, HAIRPIN_VIP, 80)


def test_dns_through_a_service_address_and_udp_across_nodes(cluster: Cluster, pods: list[Pod]) -> None:
    names = list(cluster.nodes)
    dns = cluster.run_pod(names[0], "dns", {"main": DNSMASQ}, image="pbt-dnsmasq:1")
    pods.append(dns)
    cluster.add_service(DNS_VIP, 53, dns, 53, protocols=("udp", "tcp"))
    client = cluster.run_pod(names[1], "resolver", dns={"servers": [DNS_VIP], "searches": ["pbt.test"]})
    pods.append(client)

    def lookup(*server: str) -> str | None:
        rc, out = cluster.exec(client, "nslookup", "-type=a", "web.pbt.test", *server)
        return out if rc == 0 and "10.1.2.3" in out else None

    wait_for(lambda: lookup(dns.ip), 15, "UDP DNS query to the pod on another node")
    wait_for(lookup, 15, "DNS through the Service address from the pod's resolv.conf")


def test_sidecar_redirect_inside_the_pod_netns(
    cluster: Cluster, web: dict[str, Pod], pods: list[Pod]
) -> None:
    """The Istio pattern: an init container redirects the pod's outbound TCP to a proxy in the
    pod (uid 1337 exempt); the app's traffic still reaches the other node through it."""
    names = list(cluster.nodes)
    target = web[names[1]]
    spec = {
        "initContainers": [
            {
                "name": "proxy-init",
                "image": "pybridge:dev",
                "command": ["nft", REDIRECT],
                "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
            }
        ],
        "containers": [
            {"name": "app", "image": BUSYBOX_IMAGE, "command": ["sleep", "3600"]},
            {
                "name": "proxy",
                "image": BUSYBOX_IMAGE,
                # a hardened container, as a mesh proxy is: the stand-in kubelet passes all of it on
                "securityContext": {
                    "runAsUser": 1337,
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "command": ["nc", "-ll", "-p", "15001", "-e", "nc", target.ip, "80"],
            },
        ],
    }
    pod = cluster.kubelets[names[0]].run_pod("meshed", spec)
    pods.append(pod)
    # nothing listens on port 81: an answer proves the redirect, its body the source address
    assert cluster.http_get(pod, target.ip, 81, container="app") == pod.ip
    rc, out = cluster.exec(pod, "sh", "-c", "id -u; touch /probe", container="proxy")
    assert rc != 0 and out.startswith("1337") and "Read-only file system" in out, out
