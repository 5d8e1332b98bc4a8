"""skel.run: the dispatcher, tested with injected IO and fake verbs that record their calls.

Expectations come from the CNI spec (SPEC section 2 "Parameters", section 5 "Error") and from the
reference Go `pkg/skel`: errors go to stdout as one JSON object with a non-zero exit, a missing or
invalid environment variable is code 4, an undecodable config is code 6, an invalid config is
code 7, an unsupported version is code 1, and anything unexpected is code 999.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnikit import skel
from cnikit.spec.errors import CNIError

ALL_VERBS = ("ADD", "DEL", "CHECK", "STATUS", "GC")
# The versions this plugin is meant to speak (brief + anchors.md 1.15): 0.3.0 to 1.1.0.
SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]

# Spec error codes (SPEC section 5), written out here rather than imported from the code under test.
INCOMPATIBLE_VERSION = 1
INVALID_ENV = 4
DECODE_FAILURE = 6
INVALID_CONFIG = 7
INTERNAL = 999

NETNS = "/var/run/netns/cni-1234"


def env_for(verb: str, **overrides: str | None) -> dict[str, str]:
    """What libcni sets for a call: all CNI_* variables (SPEC "Parameters")."""
    env = {
        "CNI_COMMAND": verb,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "",
        "CNI_PATH": "/opt/cni/bin",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def conf(version: str = "1.0.0", **extra: Any) -> bytes:
    body: dict[str, Any] = {"cniVersion": version, "name": "testnet", "type": "pybridge"}
    body.update(extra)
    return json.dumps(body).encode()


@dataclass
class FakeVerbs:
    """A verb table whose verbs record each Request; `behaviour` maps a verb to what it does."""

    behaviour: dict[str, Callable[[skel.Request], Any]] = field(default_factory=dict)
    calls: list[tuple[str, skel.Request]] = field(default_factory=list)
    loads: int = 0

    def loader(self) -> Mapping[str, skel.Verb]:
        self.loads += 1
        return {verb: self._verb(verb) for verb in ALL_VERBS}

    def _verb(self, verb: str) -> skel.Verb:
        def call(req: skel.Request) -> Any:
            self.calls.append((verb, req))
            action = self.behaviour.get(verb)
            return action(req) if action else None

        return call


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    verbs: FakeVerbs

    def doc(self) -> dict[str, Any]:
        return single_json_object(self.stdout)

    def error(self) -> dict[str, Any]:
        assert self.code != 0, f"expected a failure, got exit 0 and {self.stdout!r}"
        body = self.doc()
        assert isinstance(body.get("code"), int) and not isinstance(body["code"], bool), body
        assert isinstance(body.get("msg"), str) and body["msg"], body
        return body


def single_json_object(text: str) -> dict[str, Any]:
    """stdout must carry exactly one JSON object and nothing else."""
    decoder = json.JSONDecoder()
    stripped = text.strip()
    assert stripped, "expected a JSON document on stdout, got nothing"
    obj, end = decoder.raw_decode(stripped)
    assert stripped[end:].strip() == "", f"trailing data after the JSON object: {stripped[end:]!r}"
    assert isinstance(obj, dict), obj
    return obj


def invoke(env: Mapping[str, str], stdin: bytes = b"", verbs: FakeVerbs | None = None) -> Outcome:
    fake = verbs if verbs is not None else FakeVerbs()
    out, err = io.StringIO(), io.StringIO()
    code = skel.run(fake.loader, env, io.BytesIO(stdin), out, program="pybridge", stderr=err)
    outcome = Outcome(code, out.getvalue(), err.getvalue(), fake)
    if outcome.stdout.strip():
        single_json_object(outcome.stdout)  # every output must parse
    assert "Traceback" not in outcome.stdout
    return outcome


# --- no CNI_COMMAND: the "about" text -------------------------------------------------------


@pytest.mark.parametrize("env", [{}, {"CNI_COMMAND": ""}, {"CNI_CONTAINERID": "abc"}])
def test_no_command_prints_about_text_to_stderr(env: dict[str, str]) -> None:
    result = invoke(env, conf())
    assert result.code == 0
    assert result.stdout == ""
    assert result.stderr.strip()
    for v in SUPPORTED:
        assert v in result.stderr
    assert result.verbs.loads == 0


# --- environment variables (code 4) ---------------------------------------------------------


@pytest.mark.parametrize("command", ["BOGUS", "add", "Version", "ADD ", "DELETE"])
def test_unknown_command_is_code_4(command: str) -> None:
    result = invoke(env_for(command), conf())
    assert result.error()["code"] == INVALID_ENV
    assert result.verbs.loads == 0


# (verb, variables removed): the spec requires CONTAINERID, NETNS and IFNAME for ADD and CHECK;
# DEL needs CONTAINERID and IFNAME only.
MISSING = [
    ("ADD", ("CNI_CONTAINERID",)),
    ("ADD", ("CNI_NETNS",)),
    ("ADD", ("CNI_IFNAME",)),
    ("ADD", ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")),
    ("CHECK", ("CNI_CONTAINERID",)),
    ("CHECK", ("CNI_NETNS",)),
    ("CHECK", ("CNI_IFNAME",)),
    ("DEL", ("CNI_CONTAINERID",)),
    ("DEL", ("CNI_IFNAME",)),
    ("DEL", ("CNI_CONTAINERID", "CNI_IFNAME")),
]


@pytest.mark.parametrize(("verb", "missing"), MISSING)
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_missing_required_variable_is_code_4_naming_it(verb: str, missing: tuple[str, ...], how: str) -> None:
    overrides: dict[str, str | None] = {name: (None if how == "unset" else "") for name in missing}
    version = "0.4.0" if verb == "CHECK" else "1.0.0"
    result = invoke(env_for(verb, **overrides), conf(version))
    body = result.error()
    assert body["code"] == INVALID_ENV
    text = body["msg"] + " " + body.get("details", "")
    for name in missing:
        assert name in text
    assert result.verbs.loads == 0
    assert result.verbs.calls == []


@pytest.mark.parametrize("how", ["unset", "empty"])
def test_del_without_netns_is_fine(how: str) -> None:
    env = env_for("DEL", CNI_NETNS=None if how == "unset" else "")
    result = invoke(env, conf())
    assert result.code == 0, result.stdout
    assert result.stdout == ""
    assert [verb for verb, _ in result.verbs.calls] == ["DEL"]
    assert result.verbs.calls[0][1].cmd.netns == ""


@pytest.mark.parametrize("verb", ["STATUS", "GC"])
def test_status_and_gc_need_no_container_variables(verb: str) -> None:
    env = {"CNI_COMMAND": verb, "CNI_PATH": "/opt/cni/bin"}
    result = invoke(env, conf("1.1.0"))
    assert result.code == 0, result.stdout
    assert [v for v, _ in result.verbs.calls] == [verb]


BAD_CONTAINER_IDS = ["-abc", "_abc", ".abc", "a b", "a/b", "a;b", "a:b", "ab\n", "ctr\u00e9", "a\x00b"]
GOOD_CONTAINER_IDS = ["abc", "A1", "0", "a-b_c.d", "f" * 64]


@pytest.mark.parametrize("verb", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("container_id", BAD_CONTAINER_IDS)
def test_bad_container_id_is_code_4(verb: str, container_id: str) -> None:
    result = invoke(env_for(verb, CNI_CONTAINERID=container_id), conf("1.0.0"))
    body = result.error()
    assert body["code"] == INVALID_ENV
    assert "CNI_CONTAINERID" in body["msg"] + body.get("details", "")
    assert result.verbs.calls == []


@pytest.mark.parametrize("container_id", GOOD_CONTAINER_IDS)
def test_good_container_id_reaches_the_verb(container_id: str) -> None:
    result = invoke(env_for("ADD", CNI_CONTAINERID=container_id), conf())
    assert result.code == 0, result.stdout
    assert result.verbs.calls[0][1].cmd.container_id == container_id


# skel's IFNAME rules: at most 15 chars, not "." or "..", no '/', ':' or whitespace.
BAD_IFNAMES = ["a" * 16, "eth/0", "eth:0", "eth 0", "eth\t0", "eth0\n", " eth0", ".", ".."]
GOOD_IFNAMES = ["eth0", "a" * 15, "net1.100", "veth-x_y", "..a", "e"]


@pytest.mark.parametrize("verb", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("ifname", BAD_IFNAMES)
def test_bad_ifname_is_code_4(verb: str, ifname: str) -> None:
    result = invoke(env_for(verb, CNI_IFNAME=ifname), conf("1.0.0"))
    body = result.error()
    assert body["code"] == INVALID_ENV
    assert "CNI_IFNAME" in body["msg"] + body.get("details", "")
    assert result.verbs.calls == []
    assert result.verbs.loads == 0


@pytest.mark.parametrize("ifname", GOOD_IFNAMES)
def test_good_ifname_reaches_the_verb(ifname: str) -> None:
    result = invoke(env_for("ADD", CNI_IFNAME=ifname), conf())
    assert result.code == 0, result.stdout
    assert result.verbs.calls[0][1].cmd.ifname == ifname


def test_relative_netns_is_refused_before_the_verb() -> None:
    result = invoke(env_for("ADD", CNI_NETNS="netns/foo"), conf())
    result.error()
    assert result.verbs.calls == []


def test_malformed_cni_args_is_code_4() -> None:
    result = invoke(env_for("ADD", CNI_ARGS="IgnoreUnknown=1;garbage"), conf())
    body = result.error()
    assert body["code"] == INVALID_ENV
    assert "CNI_ARGS" in body["msg"] + body.get("details", "")
    assert result.verbs.loads == 0


# --- decoding the config (code 6) -----------------------------------------------------------

UNDECODABLE = {
    "empty": b"",
    "whitespace": b"  \n",
    "truncated": b'{"cniVersion": "1.0.0", "name": "x"',
    "not json": b"cniVersion=1.0.0",
    "array": b'["cniVersion", "1.0.0"]',
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "invalid utf-8": b'{"cniVersion": "1.0.0", "name": "\xff\xfe\xfa"}',
    "lone continuation byte": b"\x80",
    "deep arrays": b"[" * 100_000,
    "deep objects": b'{"a":' * 100_000,
    "two documents": conf() + conf(),
}


@pytest.mark.parametrize("verb", ["ADD", "DEL"])
@pytest.mark.parametrize("data", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
def test_undecodable_config_is_code_6(verb: str, data: bytes) -> None:
    result = invoke(env_for(verb), data)
    body = result.error()
    assert body["code"] == DECODE_FAILURE
    assert "Traceback" not in result.stderr
    assert result.verbs.calls == []


# --- the network name (code 7) --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MISSING",
        None,
        123,
        ["testnet"],
        {"n": 1},
        True,
        "",
        "a/b",
        "/etc",
        "..",
        ".",
        "../../etc",
        ".hidden",
        "-net",
        "net work",
        "net\n",
        "net\u00e9",
        "n" * 300,
    ],
)
def test_missing_or_invalid_name_is_code_7(name: Any) -> None:
    body: dict[str, Any] = {"cniVersion": "1.0.0", "type": "pybridge"}
    if name != "MISSING":
        body["name"] = name
    result = invoke(env_for("ADD"), json.dumps(body).encode())
    err = result.error()
    assert err["code"] == INVALID_CONFIG
    assert "name" in err["msg"] + err.get("details", "")
    assert result.verbs.calls == []


@pytest.mark.parametrize("name", ["a", "testnet", "k8s-pod-network", "net_1.v2", "0net", "n" * 64])
def test_valid_names_are_accepted(name: str) -> None:
    data = json.dumps({"cniVersion": "1.0.0", "name": name}).encode()
    result = invoke(env_for("ADD"), data)
    assert result.code == 0, result.stdout
    assert result.verbs.calls[0][1].config["name"] == name


# --- versions (code 1) ----------------------------------------------------------------------

UNSUPPORTED_VERSIONS: list[Any] = ["MISSING", "0.1.0", "0.2.0", "9.9.9", "1.2.0", "1.0", "", "v1.0.0",
                                   None, 1.0, 100, ["1.0.0"], {"v": "1.0.0"}]


@pytest.mark.parametrize("verb", ["ADD", "DEL"])
@pytest.mark.parametrize("version", UNSUPPORTED_VERSIONS)
def test_unsupported_version_is_code_1(verb: str, version: Any) -> None:
    body: dict[str, Any] = {"name": "testnet", "type": "pybridge"}
    if version != "MISSING":
        body["cniVersion"] = version
    result = invoke(env_for(verb), json.dumps(body).encode())
    assert result.error()["code"] == INCOMPATIBLE_VERSION
    assert result.verbs.calls == []


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize("verb", ["ADD", "DEL"])
def test_supported_versions_reach_add_and_del(verb: str, version: str) -> None:
    result = invoke(env_for(verb), conf(version))
    assert result.code == 0, result.stdout
    (called, req), = result.verbs.calls
    assert called == verb
    assert req.cni_version == version


# A verb exists only from some spec version on: CHECK from 0.4.0, STATUS and GC from 1.1.0.
VERB_GATES = [
    ("CHECK", "0.3.0", False),
    ("CHECK", "0.3.1", False),
    ("CHECK", "0.4.0", True),
    ("CHECK", "1.0.0", True),
    ("CHECK", "1.1.0", True),
    ("STATUS", "0.4.0", False),
    ("STATUS", "1.0.0", False),
    ("STATUS", "1.1.0", True),
    ("GC", "0.4.0", False),
    ("GC", "1.0.0", False),
    ("GC", "1.1.0", True),
]


@pytest.mark.parametrize(("verb", "version", "allowed"), VERB_GATES)
def test_verb_version_gates(verb: str, version: str, allowed: bool) -> None:
    result = invoke(env_for(verb), conf(version))
    if allowed:
        assert result.code == 0, result.stdout
        assert [v for v, _ in result.verbs.calls] == [verb]
    else:
        body = result.error()
        assert body["code"] == INCOMPATIBLE_VERSION
        assert verb in body["msg"] + body.get("details", "")
        assert result.verbs.calls == []


# --- VERSION --------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [*SUPPORTED, "0.2.0", "9.9.9"])
def test_version_echoes_input_and_lists_supported(asked: str) -> None:
    result = invoke({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": asked}).encode())
    assert result.code == 0
    body = result.doc()
    assert body["cniVersion"] == asked
    assert body["supportedVersions"] == SUPPORTED
    assert result.verbs.loads == 0


def test_version_with_empty_stdin() -> None:
    result = invoke({"CNI_COMMAND": "VERSION"}, b"")
    assert result.code == 0
    body = result.doc()
    assert body["supportedVersions"] == SUPPORTED
    assert body["cniVersion"] == "1.1.0"
    assert result.verbs.loads == 0


def test_version_as_libcni_sends_it() -> None:
    # libcni: CNI_NETNS=dummy CNI_IFNAME=dummy CNI_PATH=dummy and stdin {"cniVersion":"1.1.0"}
    env = {"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy", "CNI_PATH": "dummy",
           "CNI_CONTAINERID": "", "CNI_ARGS": ""}
    result = invoke(env, b'{"cniVersion":"1.1.0"}')
    assert result.code == 0
    assert result.doc() == {"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}
    assert result.verbs.loads == 0


# --- what the verb returns or raises --------------------------------------------------------


def test_verb_gets_a_request_built_from_env_and_stdin() -> None:
    data = conf("0.4.0", bridge="br0", ipam={"type": "host-local"})
    env = env_for("ADD", CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web", CNI_PATH="/opt/cni/bin::/usr/lib/cni")
    result = invoke(env, data)
    assert result.code == 0, result.stdout
    (verb, req), = result.verbs.calls
    assert verb == "ADD"
    assert req.raw_config == data
    assert req.config == json.loads(data)
    assert req.cni_version == "0.4.0"
    assert req.cmd.command == "ADD"
    assert req.cmd.container_id == "c0ffee"
    assert req.cmd.netns == NETNS
    assert req.cmd.ifname == "eth0"
    assert req.cmd.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert req.cmd.cni_args["K8S_POD_NAME"] == "web"
    assert req.env["CNI_PATH"] == "/opt/cni/bin::/usr/lib/cni"
    assert result.verbs.loads == 1


def test_verb_result_is_printed_as_json() -> None:
    reply = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:02", "sandbox": NETNS}],
        "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0}],
        "dns": {},
    }
    fake = FakeVerbs({"ADD": lambda req: reply})
    result = invoke(env_for("ADD"), conf(), fake)
    assert result.code == 0
    assert result.doc() == reply


@pytest.mark.parametrize("verb", ["DEL", "CHECK", "STATUS", "GC"])
def test_verb_returning_none_prints_nothing(verb: str) -> None:
    result = invoke(env_for(verb), conf("1.1.0"))
    assert result.code == 0
    assert result.stdout == ""


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize(
    ("code", "msg", "details"),
    [(11, "try again later", "lock busy"), (3, "gone", ""), (7, "invalid field 'mtu'", "too big"),
     (120, "mine", "x")],
)
def test_verb_cni_error_is_printed_with_its_code(version: str, code: int, msg: str, details: str) -> None:
    def fail(req: skel.Request) -> Any:
        raise CNIError(code, msg, details)

    result = invoke(env_for("ADD"), conf(version), FakeVerbs({"ADD": fail}))
    assert result.code == 1
    body = result.error()
    assert body["code"] == code
    assert body["msg"] == msg
    assert body.get("details", "") == details
    assert body["cniVersion"] == version


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom\nsecond line"), KeyError("k"), ValueError(""), OSError(28, "No space left on device"),
     ZeroDivisionError("division by zero"), RecursionError("deep")],
    ids=lambda e: type(e).__name__,
)
def test_unexpected_exception_is_code_999_on_one_line(exc: Exception) -> None:
    def fail(req: skel.Request) -> Any:
        raise exc

    result = invoke(env_for("ADD"), conf(), FakeVerbs({"ADD": fail}))
    assert result.code == 1
    body = result.error()
    assert body["code"] == INTERNAL
    for key in ("msg", "details"):
        assert "\n" not in body.get(key, "")
    assert "second line" not in result.stdout
    assert "Traceback" not in result.stdout
    assert "Traceback" not in result.stderr
    assert result.stdout.count("\n") <= 1  # a single JSON document


def test_runtime_error_first_line_is_kept() -> None:
    def fail(req: skel.Request) -> Any:
        raise RuntimeError("boom\nsecond line")

    result = invoke(env_for("DEL"), conf(), FakeVerbs({"DEL": fail}))
    body = result.error()
    assert body["code"] == INTERNAL
    assert "boom" in body["msg"] + " " + body.get("details", "")


def test_loader_failure_is_an_error_not_a_crash() -> None:
    def loader() -> Mapping[str, skel.Verb]:
        raise ImportError("No module named 'pyroute2'")

    out, err = io.StringIO(), io.StringIO()
    code = skel.run(loader, env_for("ADD"), io.BytesIO(conf()), out, program="pybridge", stderr=err)
    assert code == 1
    assert single_json_object(out.getvalue())["code"] == INTERNAL


def test_stdin_read_error_is_code_5() -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            raise OSError(5, "Input/output error")

    out = io.StringIO()
    code = skel.run(FakeVerbs().loader, env_for("ADD"), Broken(), out, program="pybridge",  # type: ignore[arg-type]
                    stderr=io.StringIO())
    assert code == 1
    assert single_json_object(out.getvalue())["code"] == 5


# --- property: run() never raises and always answers with one JSON object -------------------

ENV_KEYS = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]
commands = st.one_of(st.sampled_from([*ALL_VERBS, "VERSION", "", "add", "BOGUS"]), st.text(max_size=12))
values = st.one_of(st.sampled_from(["", "abc", "eth0", NETNS, "/proc/self/ns/net", ".", "a" * 16,
                                    "IgnoreUnknown=1;IP=10.0.0.2", "K=V;bad"]), st.text(max_size=40))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
configs = st.fixed_dictionaries(
    {},
    optional={
        "cniVersion": st.one_of(st.sampled_from([*SUPPORTED, "0.2.0", "9.9.9", ""]), json_values),
        "name": st.one_of(st.sampled_from(["net", "a/b", "..", "x" * 200]), json_values),
        "type": st.just("pybridge"),
        "extra": json_values,
    },
).map(lambda d: json.dumps(d).encode())
stdins = st.one_of(st.binary(max_size=200), configs, configs.map(lambda b: b[: len(b) // 2]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=commands, others=st.dictionaries(st.sampled_from(ENV_KEYS), values), stdin=stdins)
def test_run_always_answers_with_one_json_object(command: str, others: dict[str, str], stdin: bytes) -> None:
    env = {**others, "CNI_COMMAND": command}
    added = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}
    fake = FakeVerbs({"ADD": lambda req: added})
    out, err = io.StringIO(), io.StringIO()
    code = skel.run(fake.loader, env, io.BytesIO(stdin), out, program="pybridge", stderr=err)
    text = out.getvalue()
    if not command:
        assert code == 0
        assert text == ""
        return
    assert code in (0, 1)
    assert "Traceback" not in text
    if code == 1:
        body = single_json_object(text)
        assert isinstance(body["code"], int) and body["code"] > 0
        assert isinstance(body["msg"], str)
        assert fake.calls == []
    elif command in ("ADD", "VERSION"):
        body = single_json_object(text)
        if command == "ADD":
            assert body == added
        else:
            assert body["supportedVersions"] == SUPPORTED
    else:
        assert command in ("DEL", "CHECK", "STATUS", "GC")
        assert text == ""
        assert [v for v, _ in fake.calls] == [command]
