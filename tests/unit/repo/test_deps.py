"""scripts/deps.sh (make deps) against stand-ins for id, dpkg-query and apt-get: it installs only
what is missing, touches nothing when all is there, and says what to do when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# What .ci/run installed before make deps existed: every tier still gets all of it.
CI_PACKAGES = {"iproute2", "nftables", "iptables", "containernetworking-plugins", "busybox-static", "make",
               "golang-go", "golang-github-appc-cni-dev", "golang-github-containerd-go-cni-dev", "containerd",
               "runc", "debootstrap", "buildah", "openssl", "prometheus"}

STUBS = {
    "id": 'echo "$STUB_UID"',
    # Every package asked about is installed, but those in $STUB_MISSING ("all": none is).
    "dpkg-query": """for p in "$@"; do case $p in -*) continue;; esac
  echo "dpkg-query $p" >>"$STUB_LOG"
  if [ "$STUB_MISSING" = all ] || [[ " $STUB_MISSING " == *" $p "* ]]; then continue; fi
  echo "$p installed"; done""",
    "apt-get": 'echo "apt-get $*" >>"$STUB_LOG"',
    "python-ok": "exit 0",
}


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for tool in ("awk", "grep", "bash"):  # the real ones, and nothing else from the machine
        os.symlink(shutil.which(tool) or tool, bin_dir / tool)
    return bin_dir


def deps(stubs: Path, mode: str, *, uid: int = 0, missing: str = "", apt: bool = True,
         python: str = "python-ok") -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = stubs.parent / "calls.log"
    log.unlink(missing_ok=True)
    if not apt:
        (stubs / "apt-get").unlink()
    env = {"PATH": str(stubs), "STUB_UID": str(uid), "STUB_MISSING": missing, "STUB_LOG": str(log),
           "PYTHON": str(stubs / python)}
    run = subprocess.run(["bash", str(REPO / "scripts/deps.sh"), mode], env=env, capture_output=True,
                         text=True, timeout=30, cwd=REPO)
    return run, log.read_text().splitlines() if log.exists() else []


def _installed(calls: list[str]) -> set[str]:
    return {word for call in calls if call.startswith("apt-get install") for word in call.split()[2:]
            if not word.startswith("-")}


def test_nothing_missing_touches_nothing(stubs: Path) -> None:
    run, calls = deps(stubs, "test")
    assert run.returncode == 0, run.stderr
    assert run.stdout == run.stderr == ""
    assert calls and all(c.startswith("dpkg-query ") for c in calls), calls  # no apt-get, not even update


def test_only_the_missing_packages_are_installed(stubs: Path) -> None:
    run, calls = deps(stubs, "test", missing="nftables prometheus")
    assert run.returncode == 0, run.stderr
    apt = [c for c in calls if c.startswith("apt-get")]
    assert apt == ["apt-get update -qq", "apt-get install -y -qq nftables",
                   "apt-get install -y -qq --no-install-recommends prometheus"], apt


def test_the_test_set_keeps_every_package_ci_installed(stubs: Path) -> None:
    run, calls = deps(stubs, "test", missing="all")
    assert run.returncode == 0, run.stderr
    assert _installed(calls) >= CI_PACKAGES, CI_PACKAGES - _installed(calls)


def test_the_test_set_has_git(stubs: Path) -> None:
    """A debootstrap minbase bookworm has no git, which the unit tier's test_docs lists the
    repository with: make unit failed there after make deps."""
    _, calls = deps(stubs, "test", missing="all")
    assert "git" in _installed(calls), _installed(calls)


def test_the_demo_set_is_small(stubs: Path) -> None:
    _, calls = deps(stubs, "demo", missing="all")
    installed = _installed(calls)
    assert {"iproute2", "nftables", "busybox-static"} <= installed
    assert not installed & {"golang-go", "containerd", "buildah", "prometheus"}, installed


def test_a_python_without_venv_gets_python3_venv(stubs: Path) -> None:
    (stubs / "python-bad").write_text("#!/bin/bash\nexit 1\n")
    (stubs / "python-bad").chmod(0o755)
    _, calls = deps(stubs, "demo", missing="python3-venv", python="python-bad")
    assert "apt-get install -y -qq python3-venv" in calls, calls


def test_not_root_stops_before_anything(stubs: Path) -> None:
    run, calls = deps(stubs, "demo", uid=1000, missing="all")
    assert run.returncode == 1
    assert "run as root (sudo make demo)" in run.stderr
    assert calls == []


def test_without_apt_one_message_names_the_packages(stubs: Path) -> None:
    run, calls = deps(stubs, "test", missing="all", apt=False)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no apt-get" in lines[0], lines
    assert "golang-go" in lines[0] and "prometheus" in lines[0], lines
    assert "Traceback" not in run.stderr and not [c for c in calls if c.startswith("apt-get")]
