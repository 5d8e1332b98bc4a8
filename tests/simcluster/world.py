"""The world around the kind-sim nodes: a throw-away netns standing for docker's `kind` network.

Bridge `kind` 172.18.0.1/24 and fc00:f853:ccd:e793::1/64 (docker's dual-stack `kind` network;
the nodes' eth0 attach to it), the fake API server's address, and
a veth to "outside" (netns, 198.51.100.2), standing for the internet: it routes back only to the
nodes' own addresses, so pods reach it through masquerade or not at all.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from testbed.harness import RUN_MARK
from testbed.node import PREFIX, sh

WORLD_NET, GATEWAY, API_PORT = "172.18.0", "172.18.0.1", 6443
WORLD_NET6 = "fc00:f853:ccd:e793:"
OUTSIDE_GW, OUTSIDE_IP = "198.51.100.1", "198.51.100.2"
CLONE_NEWNET = 0x40000000


def listen_in_netns(netns: str, address: str, port: int) -> socket.socket:
    """A listening TCP socket made inside `netns` (it stays there; this thread returns home)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            sock = socket.create_server((address, port), reuse_port=False)
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(home)
        os.close(target)
    return sock


def make_pki(directory: Path, ip: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for `ip` (what kubeadm makes for kind)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, crt, key = (directory / n for n in ("ca.crt", "ca.key", "apiserver.crt", "apiserver.key"))
    ec = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    sh("openssl", *ec, "-keyout", ca_key, "-out", ca, "-subj", "/CN=pbt-kindsim-ca")
    sh(
        "openssl",
        *ec,
        "-keyout",
        key,
        "-out",
        crt,
        "-subj",
        "/CN=kube-apiserver",
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-addext",
        f"subjectAltName=IP:{ip}",
    )
    return ca, crt, key


@dataclass
class World:
    netns: str = ""
    outside: str = ""

    def up(self, tag: str) -> None:
        self.netns, self.outside = f"{PREFIX}{RUN_MARK}-ks{tag}-world", f"{PREFIX}{RUN_MARK}-ks{tag}-out"
        for ns in (self.netns, self.outside):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        w = ("ip", "-n", self.netns)
        sh(*w, "link", "add", "kind", "type", "bridge")
        sh(*w, "addr", "add", f"{GATEWAY}/24", "dev", "kind")
        sh(*w, "addr", "add", f"{WORLD_NET6}:1/64", "dev", "kind", "nodad")
        sh(*w, "link", "set", "kind", "up")
        sh(*w, "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", self.outside)
        sh(*w, "addr", "add", f"{OUTSIDE_GW}/24", "dev", "out0")
        sh(*w, "link", "set", "out0", "up")
        sh("ip", "netns", "exec", self.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        o = ("ip", "-n", self.outside)
        sh(*o, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        sh(*o, "link", "set", "eth0", "up")
        sh(*o, "route", "add", f"{WORLD_NET}.0/24", "via", OUTSIDE_GW)  # the nodes, never the pods

    def attach(self, netns: str, index: int) -> tuple[str, str]:
        """Wire `netns` to the bridge as docker wires a kind node: eth0, the next address of
        each family (IPv4, IPv6)."""
        ip, ip6 = f"{WORLD_NET}.{10 + index}", f"{WORLD_NET6}:{10 + index:x}"
        port = f"kind{index}-{secrets.token_hex(2)}"
        w, n = ("ip", "-n", self.netns), ("ip", "-n", netns)
        sh(*w, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh(*w, "link", "set", port, "master", "kind", "up")
        sh(*n, "link", "set", "lo", "up")
        sh(*n, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh(*n, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        sh(*n, "link", "set", "eth0", "up")
        sh(*n, "route", "add", "default", "via", GATEWAY)
        sh(*n, "-6", "route", "add", "default", "via", f"{WORLD_NET6}:1")
        sh("ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
           "net.ipv6.conf.all.forwarding=1")
        return ip, ip6

    def down(self) -> None:
        for ns in (self.netns, self.outside):
            if ns:
                sh("ip", "netns", "del", ns, check=False)
