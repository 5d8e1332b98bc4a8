"""Exec delegation of a non-pyipam IPAM plugin (SPEC section 4, anchors.md 1.12).

The delegate is found by its `ipam.type` in CNI_PATH, run "with the same environment and
configuration that it received" with only CNI_COMMAND overridden, and its error object is
propagated. A fake plugin (a /bin/sh script) records what it received.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import ipam_client
from cnikit import skel
from cnikit.spec.args import from_env
from cnikit.spec.errors import CNIError

INVALID_CONFIG = 7
DECODE_FAILURE = 6
INTERNAL = 999

IPAM_RESULT = {
    "cniVersion": "1.0.0",
    "ips": [{"address": "10.22.0.7/16", "gateway": "10.22.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


def write_plugin(directory: Path, body: str, name: str = "fake-ipam") -> Path:
    """A fake IPAM plugin: records env and stdin in `directory`, then runs `body`."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text(
        "#!/bin/sh\n"
        f"env > '{directory}/env.out'\n"
        f"cat > '{directory}/stdin.out'\n"
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def reply(obj: Any, exit_code: int = 0) -> str:
    text = json.dumps(obj) if not isinstance(obj, str) else obj
    return f"cat <<'EOF'\n{text}\nEOF\nexit {exit_code}"


def make_request(cni_path: str, verb: str = "ADD", config: dict[str, Any] | None = None,
                 raw: bytes | None = None) -> skel.Request:
    conf = config or {"cniVersion": "1.0.0", "name": "testnet", "type": "pybridge",
                      "ipam": {"type": "fake-ipam", "subnet": "10.22.0.0/16"}}
    # key order and spacing chosen so a re-serialisation would not be byte-identical
    data = raw if raw is not None else json.dumps(conf, indent=1, sort_keys=False).encode() + b"\n"
    env = {
        "CNI_COMMAND": verb,
        "CNI_CONTAINERID": "ctr-42",
        "CNI_NETNS": "/var/run/netns/cni-42",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web",
        "CNI_PATH": cni_path,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYBRIDGE_TEST_MARKER": "kept",
    }
    return skel.Request(cmd=from_env(env), env=env, config=json.loads(data), raw_config=data,
                        cni_version=json.loads(data)["cniVersion"])


def recorded_env(directory: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in (directory / "env.out").read_text().splitlines())
    return {k: v for k, _, v in pairs}


def test_add_finds_plugin_in_cni_path_and_parses_its_result(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    plugins = tmp_path / "plugins"
    write_plugin(plugins, reply(IPAM_RESULT))
    req = make_request(f"{empty}:{plugins}")
    result = ipam_client.add(req, "fake-ipam")
    assert [ip.address for ip in result.ips] == ["10.22.0.7/16"]
    assert result.ips[0].gateway == "10.22.0.1"
    assert (plugins / "stdin.out").read_bytes() == req.raw_config


def test_non_executable_file_earlier_in_path_is_skipped(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    (first / "fake-ipam").write_text("#!/bin/sh\necho '{}'\n")  # not executable
    second = tmp_path / "second"
    write_plugin(second, reply(IPAM_RESULT))
    result = ipam_client.add(make_request(f"{first}:{second}"), "fake-ipam")
    assert result.ips[0].address == "10.22.0.7/16"


@pytest.mark.parametrize(
    ("call", "verb"),
    [
        (lambda req: ipam_client.add(req, "fake-ipam"), "ADD"),
        (lambda req: ipam_client.delete(req, "fake-ipam"), "DEL"),
        (lambda req: ipam_client.check(req, "fake-ipam"), "CHECK"),
        (lambda req: ipam_client.status(req, "fake-ipam"), "STATUS"),
        (lambda req: ipam_client.gc(req, "fake-ipam"), "GC"),
    ],
    ids=["add", "delete", "check", "status", "gc"],
)
def test_same_stdin_and_env_with_command_overridden(tmp_path: Path, call: Any, verb: str) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, reply(IPAM_RESULT) if verb == "ADD" else "exit 0")
    # The outer call's CNI_COMMAND differs, so the override is visible.
    req = make_request(str(plugins), verb="DEL" if verb == "ADD" else "ADD")
    call(req)
    assert (plugins / "stdin.out").read_bytes() == req.raw_config
    seen = recorded_env(plugins)
    assert seen["CNI_COMMAND"] == verb
    for key in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH", "PYBRIDGE_TEST_MARKER"):
        assert seen[key] == req.env[key], key


@pytest.mark.parametrize(
    ("code", "msg", "details"),
    [(11, "try again later", "lock busy"), (7, "invalid range", ""),
     (100, "no free addresses", "10.22.0.0/16")],
)
@pytest.mark.parametrize("verb", ["add", "delete", "check"])
def test_plugin_error_object_is_re_raised(tmp_path: Path, code: int, msg: str, details: str,
                                          verb: str) -> None:
    plugins = tmp_path / "plugins"
    err: dict[str, Any] = {"cniVersion": "1.0.0", "code": code, "msg": msg}
    if details:
        err["details"] = details
    write_plugin(plugins, reply(err, 1))
    with pytest.raises(CNIError) as info:
        getattr(ipam_client, verb)(make_request(str(plugins)), "fake-ipam")
    assert info.value.code == code
    assert info.value.msg == msg
    assert info.value.details == details


def test_gc_collects_the_error_instead_of_raising(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, reply({"code": 11, "msg": "busy"}, 1))
    errors = ipam_client.gc(make_request(str(plugins)), "fake-ipam")
    assert len(errors) == 1
    assert "busy" in errors[0]


@pytest.mark.parametrize("path", ["", "/nonexistent/a:/nonexistent/b"])
def test_missing_plugin_is_code_7_naming_cni_path(tmp_path: Path, path: str) -> None:
    req = make_request(path)
    with pytest.raises(CNIError) as info:
        ipam_client.add(req, "fake-ipam")
    assert info.value.code == INVALID_CONFIG
    text = str(info.value)
    assert "CNI_PATH" in text
    assert "fake-ipam" in text
    for directory in filter(None, path.split(":")):
        assert directory in text


@pytest.mark.parametrize("output", ["", "Segmentation fault", "{not json", "[1, 2]", '{"msg": "no code"}',
                                    '{"code": "7", "msg": "string code"}'])
def test_garbage_output_with_failure_is_code_999(tmp_path: Path, output: str) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, reply(output, 1) if output else "exit 1")
    with pytest.raises(CNIError) as info:
        ipam_client.add(make_request(str(plugins)), "fake-ipam")
    assert info.value.code == INTERNAL


@pytest.mark.parametrize("bad_code", [True, False])
def test_bool_code_from_delegate_is_not_an_error_code(tmp_path: Path, bad_code: bool) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, reply({"code": bad_code, "msg": "weird"}, 1))
    with pytest.raises(CNIError) as info:
        ipam_client.add(make_request(str(plugins)), "fake-ipam")
    assert type(info.value.code) is int
    assert info.value.code == INTERNAL


@pytest.mark.parametrize("output", ["", "garbage", "[]"])
def test_garbage_output_with_success_is_a_decode_error(tmp_path: Path, output: str) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, reply(output, 0) if output else "exit 0")
    with pytest.raises(CNIError) as info:
        ipam_client.add(make_request(str(plugins)), "fake-ipam")
    assert info.value.code == DECODE_FAILURE


@pytest.mark.parametrize("result", [{"cniVersion": "1.0.0"}, {"cniVersion": "1.0.0", "ips": []},
                                    {"cniVersion": "0.2.0", "ip4": {"ip": "10.22.0.7/16"}}])
def test_result_without_ips_is_an_error(tmp_path: Path, result: dict[str, Any]) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, reply(result))
    with pytest.raises(CNIError) as info:
        ipam_client.add(make_request(str(plugins)), "fake-ipam")
    assert info.value.code != 0
    assert "IP" in str(info.value)


def test_0_4_result_with_version_fields_is_accepted(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    result = {"cniVersion": "0.4.0",
              "ips": [{"version": "4", "address": "10.22.0.7/16", "gateway": "10.22.0.1"},
                      {"version": "6", "address": "fd00::7/64"}]}
    write_plugin(plugins, reply(result))
    config = {"cniVersion": "0.4.0", "name": "testnet", "ipam": {"type": "fake-ipam"}}
    got = ipam_client.add(make_request(str(plugins), config=config), "fake-ipam")
    assert [ip.family for ip in got.ips] == [4, 6]


def test_delete_success_with_no_output(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "exit 0")
    assert ipam_client.delete(make_request(str(plugins), verb="DEL"), "fake-ipam") is None
    assert recorded_env(plugins)["CNI_COMMAND"] == "DEL"
