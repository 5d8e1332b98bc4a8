"""`make install` as a user runs it: a venv of its own, the compiled client in the CNI bin dir."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed.harness import Host, bridge_conf

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("make-install")
    prefix, bin_dir = base / "pybridge", base / "cni-bin"
    proc = subprocess.run(["make", "-C", str(ROOT), "install", f"PREFIX={prefix}", f"CNI_BIN_DIR={bin_dir}"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return prefix, bin_dir


def test_install_layout(installed: tuple[Path, Path]) -> None:
    prefix, bin_dir = installed
    for program in ("pybridge", "pyipam"):
        assert (bin_dir / program).read_bytes()[:4] == b"\x7fELF"  # the compiled client
        launcher = (prefix / "libexec" / program).read_text().splitlines()
        # An absolute interpreter of the install's own venv, isolated: never a shim on PATH.
        assert launcher[0] == f"#!{prefix}/bin/python -IS"
        assert str(ROOT) not in "\n".join(launcher), "the launcher must not import from the checkout"
        reply = subprocess.run([str(bin_dir / program)], input=b"{}", capture_output=True, check=False,
                               env={"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]})
        assert reply.returncode == 0 and b'"1.1.0"' in reply.stdout
    # The manual the systemd units' Documentation= names.
    doc = prefix / "share/doc/pybridge"
    assert (doc / "docs/operations.md").read_text() == (ROOT / "docs/operations.md").read_text()
    assert (doc / "README.md").is_file()


def test_installed_plugin_serves_add_and_del(installed: tuple[Path, Path], host: Host) -> None:
    _prefix, bin_dir = installed
    conf = bridge_conf(host)
    pod = host.new_pod()
    added = host.cni("ADD", conf, pod, plugin=str(bin_dir / "pybridge"))
    assert added.ok, added.stdout + added.stderr
    assert host.ping(pod, "10.88.0.1")
    assert host.cni("DEL", conf, pod, plugin=str(bin_dir / "pybridge")).ok
    assert host.reservations("testnet") == {}
