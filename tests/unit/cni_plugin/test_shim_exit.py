"""A call served in-process by the launcher ends without the interpreter's teardown: its exit
code and its whole output must survive that."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cni_plugin.install import write_launchers


@pytest.fixture(scope="module")
def launchers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bin_dir = tmp_path_factory.mktemp("launchers")
    write_launchers(str(bin_dir), sys.executable)
    return bin_dir


def _call(launcher: Path, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(launcher)], input=stdin, capture_output=True, check=False, timeout=60,
                          env={"PATH": os.environ.get("PATH", ""), "PYBRIDGE_AGENT_SOCKET": "", **env})


@pytest.mark.parametrize("program", ["pybridge", "pyipam"])
def test_an_error_keeps_its_code_and_whole_answer(launchers: Path, program: str) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0"}
    done = _call(launchers / program, env, b'{"cniVersion": "1.0.0", "name": "n", "ipam": ' + b"[" * 100)
    assert done.returncode == 1
    assert json.loads(done.stdout)["code"] == 6  # decode failure, the document complete


def test_a_large_answer_is_written_whole(launchers: Path, tmp_path: Path) -> None:
    long_version = "9." * 30000 + "0"
    done = _call(launchers / "pyipam", {"CNI_COMMAND": "VERSION"},
                 json.dumps({"cniVersion": long_version}).encode())
    assert done.returncode == 0
    assert json.loads(done.stdout)["cniVersion"] == long_version


def test_an_unknown_verb_exits_non_zero(launchers: Path) -> None:
    done = _call(launchers / "pybridge", {"CNI_COMMAND": "BOGUS"}, b"{}")
    assert done.returncode == 1
    assert json.loads(done.stdout)["code"] == 4
