"""sysctl keeps /proc/sys/net directories open for its own netns only: a thread in a pod netns
reads and writes the pod's knobs, before and after the host's directories were cached; and a
directory opened in the pod names the pod's knobs whichever thread writes below it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from testbed.harness import delete_netns, new_netns, sh

pytestmark = pytest.mark.netns

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from cni_plugin import netns, sysctl

    pod, other = (os.open(f"/run/netns/{name}", os.O_RDONLY) for name in sys.argv[1:3])
    netns.run_in(pod, lambda: sysctl.write("net/ipv4/ip_forward", "1"))  # before any cache
    print(sysctl.read("net/ipv4/ip_forward"))  # the host's, cached from here on
    sysctl.ensure("net/ipv4/ip_forward", "1")
    print(netns.run_in(other, lambda: sysctl.read("net/ipv4/ip_forward")))
    netns.run_in(other, lambda: sysctl.try_write("net/ipv6/conf/lo/disable_ipv6", "1"))
    print(sysctl.read("net/ipv6/conf/lo/disable_ipv6"))

    conf = netns.run_in(pod, lambda: sysctl.open_dir("net/ipv6/conf/"))
    subprocess.run(["ip", "-n", sys.argv[1], "link", "add", "late0", "type", "veth", "peer", "late1"],
                   check=True)  # born after the directory was opened
    sysctl.write("late0/disable_ipv6", "1", conf)
    sysctl.write("lo/keep_addr_on_down", "1", conf)
    os.close(conf)
    print(sysctl.read("net/ipv6/conf/lo/keep_addr_on_down"), os.path.exists("/proc/sys/net/ipv6/conf/late0"))
""")


def _read(ns: str, key: str) -> str:
    return sh("ip", "netns", "exec", ns, "cat", f"/proc/sys/{key}").stdout.decode().strip()


def test_each_thread_sees_its_own_netns() -> None:
    host, pod, other = new_netns("sysctl-host"), new_netns("sysctl-pod"), new_netns("sysctl-other")
    try:
        proc = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-c", SCRIPT, pod, other],
                              capture_output=True, text=True, check=True, timeout=60)
        # What each step saw: the host's forwarding off, then the other pod's still off after the
        # host's went on, and the host's lo untouched by the other pod's write.
        # Writes from the host's thread below the pod's directory set the pod's knobs, not the host's.
        assert proc.stdout.split() == ["0", "0", "0", "0", "False"], proc.stdout
        assert _read(pod, "net/ipv6/conf/lo/keep_addr_on_down") == "1"
        assert _read(pod, "net/ipv6/conf/late0/disable_ipv6") == "1"
        assert _read(pod, "net/ipv6/conf/late1/disable_ipv6") == "0"
        assert _read(host, "net/ipv4/ip_forward") == "1"
        assert _read(pod, "net/ipv4/ip_forward") == "1"
        assert _read(other, "net/ipv4/ip_forward") == "0"
        assert _read(other, "net/ipv6/conf/lo/disable_ipv6") == "1"
    finally:
        for ns in (host, pod, other):
            delete_netns(ns)
