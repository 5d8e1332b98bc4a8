"""The installed `pybridge` executable, run as the runtime runs it: env + stdin in, stdout + exit code
out. Only paths that need no root: VERSION, the about text, and errors raised before any netlink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.prefix) / "bin" / "pybridge"
if not BIN.exists():  # pragma: no cover - fall back to the repo venv
    BIN = Path(__file__).resolve().parents[3] / ".venv" / "bin" / "pybridge"

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]

pytestmark = pytest.mark.skipif(not BIN.exists(), reason=f"{BIN} not installed")


def run(env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # Like libcni: the CNI_* variables on top of a plain environment (no logging configured).
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run([str(BIN)], input=stdin, env={**base, **env}, capture_output=True, timeout=60,
                          check=False)


def one_json_object(out: bytes) -> dict[str, Any]:
    text = out.decode()
    obj, end = json.JSONDecoder().raw_decode(text.strip())
    assert text.strip()[end:].strip() == ""
    assert isinstance(obj, dict)
    return obj


def add_env() -> dict[str, str]:
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "cli-test",
            "CNI_NETNS": "/var/run/netns/cli-test-absent", "CNI_IFNAME": "eth0", "CNI_ARGS": "",
            "CNI_PATH": "/nonexistent"}


def test_version_with_empty_stdin() -> None:
    proc = run({"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0, proc.stderr
    body = one_json_object(proc.stdout)
    assert body["supportedVersions"] == SUPPORTED
    assert isinstance(body["cniVersion"], str)


@pytest.mark.parametrize("asked", ["0.3.1", "1.1.0"])
def test_version_echoes_the_input(asked: str) -> None:
    proc = run({"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy", "CNI_PATH": "dummy"},
               json.dumps({"cniVersion": asked}).encode())
    assert proc.returncode == 0, proc.stderr
    assert one_json_object(proc.stdout) == {"cniVersion": asked, "supportedVersions": SUPPORTED}


def test_no_command_prints_about_text() -> None:
    proc = run({})
    assert proc.returncode == 0
    assert proc.stdout == b""
    about = proc.stderr.decode()
    for version in SUPPORTED:
        assert version in about


@pytest.mark.parametrize(
    ("config", "code", "word"),
    [
        ({"cniVersion": "1.0.0", "name": "clinet", "type": "pybridge", "hairpinMode": True,
          "promiscMode": True}, 7, "hairpinMode"),
        ({"cniVersion": "1.0.0", "name": "clinet", "type": "pybridge", "mtu": 10}, 7, "mtu"),
        ({"cniVersion": "1.0.0", "name": "clinet", "type": "pybridge", "bridge": "a-very-long-bridge-name"},
         7, "bridge"),
        ({"cniVersion": "1.0.0", "name": "clinet", "type": "pybridge", "vlanTrunk": [{"id": 5}]},
         2, "vlanTrunk"),
        ({"cniVersion": "0.2.0", "name": "clinet", "type": "pybridge"}, 1, ""),
        ({"cniVersion": "1.0.0", "type": "pybridge"}, 7, "name"),
    ],
    ids=["hairpin+promisc", "mtu", "bridge", "vlanTrunk", "version", "no-name"],
)
def test_add_with_bad_config_is_a_json_error(config: dict[str, Any], code: int, word: str) -> None:
    proc = run(add_env(), json.dumps(config).encode())
    assert proc.returncode == 1
    body = one_json_object(proc.stdout)
    assert body["code"] == code
    assert word in body["msg"] + " " + body.get("details", "")
    assert b"Traceback" not in proc.stdout + proc.stderr


def test_add_with_undecodable_config_is_code_6() -> None:
    proc = run(add_env(), b"{not json")
    assert proc.returncode == 1
    assert one_json_object(proc.stdout)["code"] == 6


def test_unknown_command_is_code_4() -> None:
    proc = run({"CNI_COMMAND": "FROB"}, b"{}")
    assert proc.returncode == 1
    assert one_json_object(proc.stdout)["code"] == 4


def test_missing_variables_are_code_4_naming_them() -> None:
    env = add_env()
    del env["CNI_IFNAME"]
    proc = run(env, b'{"cniVersion": "1.0.0", "name": "clinet"}')
    assert proc.returncode == 1
    body = one_json_object(proc.stdout)
    assert body["code"] == 4
    assert "CNI_IFNAME" in body["msg"] + " " + body.get("details", "")
