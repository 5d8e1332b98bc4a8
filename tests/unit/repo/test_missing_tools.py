"""Without `ip` and `nft` the root tiers are skipped with one reason naming the packages, instead
of every test erroring in the suite's guard (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _pytest(path_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYBRIDGE_REQUIRE_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        cwd=REPO, env={**environ, "PATH": str(path_dir), **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="the guard and the root tiers run only as root")
def test_root_tiers_are_skipped_once_naming_the_package(tmp_path: Path) -> None:
    run = _pytest(tmp_path, "tests/netns/test_bridge.py",
                  "tests/unit/cnikit/test_removals.py::test_removals_run_in_order_on_one_thread_past_a_failure")
    assert run.returncode == 0, run.stdout + run.stderr
    reasons = {line.split(": ", 1)[1] for line in run.stdout.splitlines() if line.startswith("SKIPPED")}
    assert len(reasons) == 1, run.stdout
    reason = reasons.pop()
    assert "Debian package iproute2" in reason and "Debian package nftables" in reason, reason
    assert re.search(r"^1 passed, \d+ skipped in", run.stdout, re.M), run.stdout
    assert " error" not in run.stdout.lower(), run.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the guard and the root tiers run only as root")
def test_required_tiers_fail_once_naming_the_package(tmp_path: Path) -> None:
    run = _pytest(tmp_path, "tests/netns/test_bridge.py", PYBRIDGE_REQUIRE_E2E="1")
    assert run.returncode == 4, run.stdout + run.stderr
    assert "Debian package nftables" in run.stderr, run.stderr
