"""CNI_* parameters: CNI_ARGS parsing, the per-verb required-variable table and the validators.

Facts used (SPEC "Parameters", CONVENTIONS.md, containerd's cniNamespaceOpts):
- CNI_ARGS is "FOO=BAR;ABC=123"; containerd sends
  IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..
- ADD/CHECK need CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME; DEL needs CNI_CONTAINERID, CNI_IFNAME;
  a missing or invalid variable is error code 4 and the error names it.
- CNI_PATH is ':'-separated.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnikit.spec.args import from_env, parse_cni_args, validate_container_id, validate_ifname
from cnikit.spec.errors import CNIError

INVALID_ENV = 4

CONTAINERD_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=x;"
    "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            CONTAINERD_ARGS,
            {
                "IgnoreUnknown": "1",
                "K8S_POD_NAMESPACE": "default",
                "K8S_POD_NAME": "x",
                "K8S_POD_INFRA_CONTAINER_ID": "abc",
                "K8S_POD_UID": "u",
            },
        ),
        ("IP=10.1.0.5", {"IP": "10.1.0.5"}),
        ("MAC=0a:58:0a:f4:00:02", {"MAC": "0a:58:0a:f4:00:02"}),
        ("IP=10.1.0.5;MAC=0a:58:0a:f4:00:02", {"IP": "10.1.0.5", "MAC": "0a:58:0a:f4:00:02"}),
        ("IP=fd00::5", {"IP": "fd00::5"}),
        ("K=", {"K": ""}),
        ("", {}),
    ],
    ids=["containerd", "ip", "mac", "ip+mac", "ipv6", "empty-value", "empty"],
)
def test_parse_cni_args(raw: str, expected: dict[str, str]) -> None:
    assert parse_cni_args(raw) == expected


@pytest.mark.parametrize("raw", ["garbage", "IP", "=10.1.0.5", "IgnoreUnknown=1;garbage", "A=1;B", ";=x"])
def test_malformed_cni_args_item_is_code_4(raw: str) -> None:
    with pytest.raises(CNIError) as info:
        parse_cni_args(raw)
    assert info.value.code == INVALID_ENV
    assert "CNI_ARGS" in str(info.value)


@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True),
                       st.from_regex(r"[A-Za-z0-9_.:/\-]{0,20}", fullmatch=True), max_size=6))
def test_parse_cni_args_round_trip(pairs: dict[str, str]) -> None:
    raw = ";".join(f"{k}={v}" for k, v in pairs.items())
    assert parse_cni_args(raw) == pairs


def base_env(command: str, **overrides: str | None) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr", "CNI_NETNS": "/run/netns/x",
           "CNI_IFNAME": "eth0", "CNI_ARGS": CONTAINERD_ARGS, "CNI_PATH": "/opt/cni/bin:/usr/lib/cni"}
    for key, value in overrides.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    return env


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_from_env_reads_every_variable(command: str) -> None:
    cmd = from_env(base_env(command))
    assert cmd.command == command
    assert cmd.container_id == "ctr"
    assert cmd.netns == "/run/netns/x"
    assert cmd.ifname == "eth0"
    assert cmd.args == CONTAINERD_ARGS
    assert cmd.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert cmd.cni_args["K8S_POD_NAME"] == "x"


# Required variables per verb (SPEC "Parameters").
REQUIRED = {
    "ADD": {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"},
    "CHECK": {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"},
    "DEL": {"CNI_CONTAINERID", "CNI_IFNAME"},
    "STATUS": set(),
    "GC": set(),
    "VERSION": set(),
}
VARIABLES = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]


@pytest.mark.parametrize("command", sorted(REQUIRED))
@pytest.mark.parametrize("variable", VARIABLES)
def test_required_variable_table(command: str, variable: str) -> None:
    env = base_env(command, **{variable: None})
    if variable in REQUIRED[command]:
        with pytest.raises(CNIError) as info:
            from_env(env)
        assert info.value.code == INVALID_ENV
        assert variable in str(info.value)
    else:
        assert from_env(env).command == command


def test_all_missing_are_named_together() -> None:
    with pytest.raises(CNIError) as info:
        from_env({"CNI_COMMAND": "ADD"})
    for name in REQUIRED["ADD"]:
        assert name in str(info.value)


@pytest.mark.parametrize("command", ["", "add", "FOO", "ADD\n"])
def test_unknown_command(command: str) -> None:
    with pytest.raises(CNIError) as info:
        from_env(base_env(command))
    assert info.value.code == INVALID_ENV


@pytest.mark.parametrize("value", ["abc", "A", "9", "a.b-c_d", "0123456789abcdef" * 4])
def test_container_id_accepted(value: str) -> None:
    assert validate_container_id(value) == value


@pytest.mark.parametrize("value", ["", "-a", ".a", "_a", "a b", "a/b", "a\\b", "a\n", "\u00e9", "a*"])
def test_container_id_rejected(value: str) -> None:
    with pytest.raises(CNIError) as info:
        validate_container_id(value)
    assert info.value.code == INVALID_ENV


@pytest.mark.parametrize("value", ["eth0", "a" * 15, "net1", "e.1", "x-y_z"])
def test_ifname_accepted(value: str) -> None:
    assert validate_ifname(value) == value


@pytest.mark.parametrize("value", ["a" * 16, "a/b", "a:b", "a b", "a\tb", "a\n", ".", ".."])
def test_ifname_rejected(value: str) -> None:
    with pytest.raises(CNIError) as info:
        validate_ifname(value)
    assert info.value.code == INVALID_ENV
    assert "CNI_IFNAME" in str(info.value)


@pytest.mark.parametrize("command", ["STATUS", "GC", "VERSION"])
def test_cni_args_not_parsed_when_unused(command: str) -> None:
    # STATUS/GC/VERSION get empty or irrelevant CNI_ARGS from libcni; they must not fail on it.
    assert from_env(base_env(command, CNI_ARGS="garbage")).command == command
