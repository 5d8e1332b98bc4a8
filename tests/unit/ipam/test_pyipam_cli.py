"""pyipam as a runtime or a bridge plugin sees it: `python -m ipam` with CNI_* variables, the
netconf on stdin, the result or error object on stdout and the exit code; plus `pyipam ls`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnikit.spec.attachments import valid_attachments

REPO = Path(__file__).resolve().parents[3]


def conf(data_dir: Path, version: str = "1.1.0", **top: Any) -> dict[str, Any]:
    ranges = [[{"subnet": "10.1.0.0/29"}], [{"subnet": "fd00::/125"}]]
    return {"cniVersion": version, "name": "net1", "type": "pybridge",
            "ipam": {"type": "pyipam", "dataDir": str(data_dir), "ranges": ranges}, **top}


def pyipam(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipam", *args],
        input=stdin.decode(), capture_output=True, text=True, timeout=60, cwd=REPO,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env},
    )


def cni(command: str, netconf: dict[str, Any], cid: str = "c1", ifname: str = "eth0",
        **env: str) -> tuple[int, Any]:
    proc = pyipam(stdin=json.dumps(netconf).encode(), CNI_COMMAND=command, CNI_CONTAINERID=cid,
                  CNI_IFNAME=ifname, CNI_NETNS="/var/run/netns/test", CNI_PATH="/opt/cni/bin", **env)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else None


def test_version() -> None:
    proc = pyipam(stdin=b'{"cniVersion": "0.4.0"}', CNI_COMMAND="VERSION")
    assert proc.returncode == 0
    reply = json.loads(proc.stdout)
    assert reply["cniVersion"] == "0.4.0"
    assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(reply["supportedVersions"])


def test_add_check_del_lifecycle(tmp_path: Path) -> None:
    netconf = conf(tmp_path)
    rc, result = cni("ADD", netconf)
    assert rc == 0
    assert result["cniVersion"] == "1.1.0"
    assert result["ips"] == [{"address": "10.1.0.2/29", "gateway": "10.1.0.1"},
                             {"address": "fd00::2/125", "gateway": "fd00::1"}]
    assert (tmp_path / "net1" / "10.1.0.2").read_bytes() == b"c1\r\neth0"

    rc, err = cni("ADD", netconf)
    assert (rc, err["code"], err["msg"]) == (1, 112, "duplicate allocation is not allowed")

    assert cni("CHECK", netconf) == (0, None)
    rc, err = cni("CHECK", netconf, ifname="eth1")
    assert (rc, err["code"]) == (1, 113)

    assert cni("DEL", netconf) == (0, None)
    assert cni("DEL", netconf) == (0, None)
    assert sorted(p.name for p in (tmp_path / "net1").iterdir()) == [
        "last_reserved_ip.0", "last_reserved_ip.1", "lock"]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_old_versions_carry_ip_version(tmp_path: Path, version: str) -> None:
    rc, result = cni("ADD", conf(tmp_path, version), CNI_ARGS="IP=10.1.0.5")
    assert rc == 0
    assert result["cniVersion"] == version
    assert [(ip["address"], ip["version"]) for ip in result["ips"]] == [
        ("10.1.0.5/29", "4"), ("fd00::2/125", "6")]


def test_invalid_config_names_the_field(tmp_path: Path) -> None:
    netconf = conf(tmp_path)
    netconf["ipam"]["ranges"][1][0]["subnet"] = "fd00::1/125"
    rc, err = cni("ADD", netconf)
    assert (rc, err["code"], err["msg"]) == (1, 7, "invalid field 'ipam.ranges[1][0].subnet'")
    assert not tmp_path.joinpath("net1").exists()


def test_status(tmp_path: Path) -> None:
    netconf = conf(tmp_path)
    assert cni("STATUS", netconf) == (0, None)
    netconf["ipam"]["ranges"] = [[{"subnet": "10.1.0.0/30"}]]
    assert cni("ADD", netconf)[0] == 0
    assert cni("STATUS", netconf) == (0, None)  # a full pool fails the next ADD, not STATUS
    (tmp_path / "file").write_text("")
    netconf["ipam"]["dataDir"] = str(tmp_path / "file" / "data")
    rc, err = cni("STATUS", netconf)
    assert (rc, err["code"]) == (1, 50)


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments", None])
def test_gc(tmp_path: Path, key: str | None) -> None:
    netconf = conf(tmp_path)
    for cid in ("keep", "drop"):
        assert cni("ADD", netconf, cid=cid)[0] == 0
    gc_conf = dict(netconf)
    if key is not None:
        gc_conf[key] = [{"containerID": "keep", "ifname": "eth0"}]
    assert cni("GC", gc_conf) == (0, None)
    left = sorted(p.name for p in (tmp_path / "net1").iterdir()
                  if p.name != "lock" and not p.name.startswith("last_reserved_ip."))
    assert left == ([] if key is None else ["10.1.0.2", "fd00::2"])


def test_gc_malformed_attachments(tmp_path: Path) -> None:
    rc, err = cni("GC", conf(tmp_path, **{"cni.dev/valid-attachments": [{"containerID": 5}]}))
    assert (rc, err["code"], err["msg"]) == (1, 7, "invalid field 'cni.dev/valid-attachments[0]'")


def test_ls(tmp_path: Path) -> None:
    assert cni("ADD", conf(tmp_path), cid="abc")[0] == 0
    proc = pyipam("ls", "--data-dir", str(tmp_path))
    assert proc.returncode == 0
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert lines == [["NETWORK", "IP", "CONTAINER", "ID", "IFNAME"],
                     ["net1", "10.1.0.2", "abc", "eth0"], ["net1", "fd00::2", "abc", "eth0"]]
    proc = pyipam("ls", "--data-dir", str(tmp_path), "--network", "other")
    assert (proc.returncode, proc.stdout.splitlines()[1:]) == (0, [])
    proc = pyipam("ls", "--data-dir", str(tmp_path), "--network", "../x")
    assert proc.returncode == 1 and "invalid field 'name'" in proc.stderr


A = {"containerID": "a", "ifname": "eth0"}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, set()),
        ({"cni.dev/valid-attachments": None, "cni.dev/attachments": None}, set()),  # Go's nil slice
        ({"cni.dev/valid-attachments": [], "cni.dev/attachments": [A]}, set()),  # the new key wins
        ({"cni.dev/attachments": [A]}, {("a", "eth0")}),
    ],
)
def test_valid_attachments_keys(config: dict[str, Any], expected: set[tuple[str, str]]) -> None:
    assert valid_attachments(config) == expected
