"""The bridge sysctls NetworkPolicy needs, on a fake /proc/sys (no root, no kernel)."""

from __future__ import annotations

from pathlib import Path

from cni_plugin.node.netpol.apply import BRIDGE_SYSCTLS, enable_bridge_netfilter


def test_off_is_turned_on_on_is_left_alone_missing_is_reported(tmp_path: Path) -> None:
    v4, v6 = (tmp_path / name for name in BRIDGE_SYSCTLS)
    v4.parent.mkdir(parents=True)
    v4.write_text("0\n")
    missing = f"{BRIDGE_SYSCTLS[1]}: [Errno 2] No such file or directory: '{v6}'"
    assert enable_bridge_netfilter(str(tmp_path)) == [missing]
    assert v4.read_text() == "1\n"
    v6.write_text("1\n")
    v6.chmod(0o444)
    v4.chmod(0o444)  # already on: not even opened for writing (root would write through 0444)
    before = (v4.stat().st_mtime_ns, v6.stat().st_mtime_ns)
    assert enable_bridge_netfilter(str(tmp_path)) == []
    assert (v4.stat().st_mtime_ns, v6.stat().st_mtime_ns) == before
