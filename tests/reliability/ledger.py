"""Counting what a crash, a reboot or churn left behind, in the host netns and in the store.

Every count is "things that should not be there" (or should be and are not): 0 is the target.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cni_plugin import masq
from testbed.harness import Host, Reply


@dataclass
class Pod:
    netns: str
    container_id: str
    ifname: str = "eth0"
    addresses: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.container_id, self.ifname


def owners(host: Host, network: str) -> dict[str, tuple[str, str]]:
    """IP -> (container id, ifname) of every reservation file in the store."""
    out = {}
    directory = host.data_dir / network
    if not directory.exists():
        return out
    for p in directory.iterdir():
        if p.name == "lock" or p.name.startswith(("last_reserved_ip.", ".")) or not p.is_file():
            continue
        try:
            content = p.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            continue  # released meanwhile (an agent may still be serving a killed client's call)
        cid, _, ifname = content.partition("\r\n")
        out[p.name] = (cid, ifname)
    return out


def host_veths(host: Host) -> list[str]:
    return [name for name, link in host.links().items()
            if link.get("linkinfo", {}).get("info_kind") == "veth"]


def masq_comments(host: Host) -> list[str]:
    proc = host.exec("nft", "-j", "list", "chain", "inet", "pybridge", "masq", check=False)
    if proc.returncode != 0:
        return []
    return [item["rule"].get("comment", "") for item in json.loads(proc.stdout)["nftables"]
            if "rule" in item]


def pod_addresses(host: Host, pod: Pod) -> list[str]:
    proc = host.pod_exec(pod.netns, "ip", "-j", "addr", "show", "dev", pod.ifname, check=False)
    if proc.returncode != 0:
        return []
    return [a["local"] for link in json.loads(proc.stdout) for a in link.get("addr_info", [])
            if a.get("scope") == "global"]


def lock_held(host: Host, network: str) -> bool:
    path = host.data_dir / network / "lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def census(host: Host, network: str, live: Iterable[Pod], masq_on: bool = True) -> dict[str, int]:
    """Leaks and losses once the runtime has cleaned up: every value must be 0."""
    pods = list(live)
    host.settle_veths(len(pods))  # veths of answered DELs the agent is still deleting
    keys = {p.key for p in pods}
    held = owners(host, network)
    tags = {masq.attachment_tag(network, *p.key) for p in pods}
    comments = masq_comments(host)
    on_pods = [a for p in pods for a in pod_addresses(host, p)]
    reserved_for = Counter(held.values())
    expected_per_pod = {p.key: len(p.addresses) for p in pods}
    return {
        "leaked_addresses": sum(1 for owner in held.values() if owner not in keys),
        "lost_reservations": sum(1 for p in pods if reserved_for[p.key] != expected_per_pod[p.key]),
        "leaked_host_veths": max(0, len(host_veths(host)) - len(pods)),
        "missing_host_veths": max(0, len(pods) - len(host_veths(host))),
        "leaked_masq_rules": sum(1 for c in comments if c not in tags),
        "missing_masq_rules": sum(1 for p in pods if masq_on and
                                  comments.count(masq.attachment_tag(network, *p.key)) != len(p.addresses)),
        "duplicate_addresses": len(on_pods) - len(set(on_pods)),
        "pod_addresses_not_reserved": sum(1 for a in on_pods if held.get(a) is None),
        "stale_lock_holders": int(lock_held(host, network)),
        "stray_store_files": len(stray_files(host, network)),
    }


def stray_files(host: Host, network: str) -> list[str]:
    """Files in the store that are neither a reservation, the lock, nor last_reserved_ip.*"""
    directory = host.data_dir / network
    if not directory.exists():
        return []
    out = []
    for p in directory.iterdir():
        if p.name == "lock" or p.name.startswith("last_reserved_ip."):
            continue
        try:
            ipaddress.ip_address(p.name)
        except ValueError:
            out.append(p.name)
            continue
        if not p.read_bytes():
            out.append(p.name)  # an empty reservation file: a ghost nobody can release
    return out


def ok(reply: Reply) -> bool:
    return reply.rc == 0


def cni_retry(host: Host, *args: Any, attempts: int = 5, **kwargs: Any) -> Reply:
    """As a runtime does: retry a call that failed with "try again later" (11)."""
    reply = host.cni(*args, **kwargs)
    for _ in range(attempts - 1):
        if reply.rc == 0 or not isinstance(reply.out, dict) or reply.out.get("code") != 11:
            break
        time.sleep(0.2)
        reply = host.cni(*args, **kwargs)
    return reply


def addresses_of(result: dict[str, Any]) -> list[str]:
    return [ip["address"].split("/")[0] for ip in result.get("ips", [])]


def run_quiet(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, capture_output=True, check=False, timeout=60)
