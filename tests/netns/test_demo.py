"""scripts/demo.sh (make demo): pods ping each other; a failing step is named with the plugin's
CNI error, and nothing is left behind either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _demo(tmp_path: Path, conflist: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "CONFLIST": str(conflist),
           "PYBRIDGE_AGENT_SOCKET": str(tmp_path / "no-agent.sock")}  # served in-process
    return subprocess.run(["bash", str(REPO / "scripts/demo.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def _demo_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith("pbdemo-")]


def test_demo_pings(tmp_path: Path) -> None:
    before = _demo_netns()
    run = _demo(tmp_path, REPO / "conf/10-pybridge.conflist")
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0% packet loss" in run.stdout and "left in the IPAM store: 0 reservations" in run.stdout
    assert _demo_netns() == before


def test_a_failed_step_is_named_with_the_plugins_error(tmp_path: Path) -> None:
    conflist = json.loads((REPO / "conf/10-pybridge.conflist").read_text())
    conflist["plugins"][0]["bridge"] = "b" * 16  # one byte over IFNAMSIZ
    path = tmp_path / "bad.conflist"
    path.write_text(json.dumps(conflist))
    before = _demo_netns()
    run = _demo(tmp_path, path)
    assert run.returncode != 0
    assert 'step "ADD pod A" failed' in run.stderr, run.stderr
    assert "pybridge ADD failed: invalid field 'bridge' (code 7)" in run.stderr, run.stderr
    assert "details: " in run.stderr and "at most 15 bytes" in run.stderr, run.stderr
    assert _demo_netns() == before
