"""PYBRIDGE_PROC_SYS: where the agent of an unprivileged DaemonSet pod finds a writable /proc/sys/net
(deploy/pybridge.yaml mounts the host's there); reads and writes go below it, nowhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
from cni_plugin import sysctl
print(sysctl.read("net/ipv4/ip_forward"))
sysctl.ensure("net/ipv6/conf/all/forwarding", "1")
print(sysctl.try_write("net/ipv6/conf/missing/accept_ra", "0"))
"""


def test_sysctls_go_below_the_configured_root(tmp_path: Path) -> None:
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv6" / "conf" / "all").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_forward").write_text("7\n")
    (tmp_path / "net" / "ipv6" / "conf" / "all" / "forwarding").write_text("0\n")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYBRIDGE_PROC_SYS": str(tmp_path)})
    assert proc.stdout.split() == ["7", "False"]
    forwarding = tmp_path / "net" / "ipv6" / "conf" / "all" / "forwarding"
    assert forwarding.read_text() == "1\n"  # written over "0\n"
