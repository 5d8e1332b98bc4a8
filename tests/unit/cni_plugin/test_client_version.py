"""The compiled client answers VERSION itself, byte for byte as the Python plugins do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cni_plugin.install import build_client, write_launchers
from cnikit.programs import PROGRAMS

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

# What libcni and cnitool send, and what a hand-written call might: the client reads these itself.
ANSWERED_BY_CLIENT = [
    b"",
    b" \n\t",
    b'{"cniVersion":"1.0.0"}',
    b'{"cniVersion":"0.3.1"}',
    b'{"cniVersion":"9.9.9"}',
    b' {\r\n "name" : "net", "cniVersion": "0.4.0" } \n',
    b"{}",
    b'{"cniVersion":""}',
    b'{"cniVersion":"0.4.0","cniVersion":"1.0.0"}',
    b'{"name":"x"}',
]
# Forms the client leaves to Python (or that Python reads differently from a naive parser).
LEFT_TO_PYTHON = [
    b'{"cniVersion":"1.0.0"',
    b'{"cniVersion":"1.0.0"} x',
    b'{"cniVersion":"1.\\u0030.0"}',
    b'{"cni\\u0056ersion":"0.4.0"}',
    '{"cniVersion":"1.0.0é"}'.encode(),
    b'\xef\xbb\xbf{"cniVersion":"0.4.0"}',
    b'{"cniVersion":1}',
    b'{"cniVersion":"0.4.0","plugins":[{"type":"x"}]}',
    b'["cniVersion"]',
    b"not json",
    b'{"cniVersion":"0.4.0",}',
]


def _client_dir(tmp: Path, fallback_dir: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    build_client(str(bin_dir / "pybridge"), str(fallback_dir))
    os.symlink("pybridge", bin_dir / "pyipam")
    return bin_dir


@pytest.fixture(scope="module")
def with_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("with-python")
    write_launchers(str(tmp / "libexec"), sys.executable)
    return _client_dir(tmp, tmp / "libexec")


@pytest.fixture(scope="module")
def without_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("without-python")
    return _client_dir(tmp, tmp / "no-such-dir")


def _env(tmp: Path) -> dict[str, str]:
    return {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", ""),
            "PYBRIDGE_AGENT_SOCKET": str(tmp / "no-agent.sock")}


def _python_answer(program: str, stdin: bytes, tmp: Path) -> bytes:
    module = "cni_plugin" if program == "pybridge" else "ipam"
    done = subprocess.run([sys.executable, "-m", module], input=stdin, env=_env(tmp),
                          capture_output=True, check=True, timeout=60)
    return done.stdout


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("stdin", ANSWERED_BY_CLIENT)
def test_the_client_alone_answers_as_python_does(
    program: str, stdin: bytes, without_python: Path, tmp_path: Path
) -> None:
    done = subprocess.run([str(without_python / program)], input=stdin, env=_env(tmp_path),
                          capture_output=True, check=False, timeout=10)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == _python_answer(program, stdin, tmp_path)


@pytest.mark.parametrize("stdin", LEFT_TO_PYTHON)
def test_other_forms_are_left_to_python(stdin: bytes, without_python: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(without_python / "pybridge")], input=stdin, env=_env(tmp_path),
                          capture_output=True, check=False, timeout=10)
    assert b"fallback missing" in done.stdout


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("stdin", ANSWERED_BY_CLIENT + LEFT_TO_PYTHON)
def test_the_installed_client_answers_every_form_as_python_does(
    program: str, stdin: bytes, with_python: Path, tmp_path: Path
) -> None:
    done = subprocess.run([str(with_python / program)], input=stdin, env=_env(tmp_path),
                          capture_output=True, check=False, timeout=60)
    assert done.returncode == 0
    assert done.stdout == _python_answer(program, stdin, tmp_path)
