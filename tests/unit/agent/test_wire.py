"""The agent protocol's bytes (agent/wire.py), against a layout written out here by hand:
little-endian u32 fields after a 4-byte magic, as client.c reads and writes them."""

from __future__ import annotations

import ast
import re
import struct
from pathlib import Path

import pytest

from cni_plugin.agent import wire


def test_a_request_is_magic_flags_three_lengths_then_the_bodies() -> None:
    raw = wire.encode_request(b"pyipam", b"A=1\0B=2", b"{}", wire.FLAG_POD_NETNS | wire.FLAG_ROOT)
    assert raw == struct.pack("<4sIIII", b"PBQ1", 3, 6, 7, 2) + b"pyipam" + b"A=1\0B=2" + b"{}"
    assert wire.decode_request_header(raw[:wire.HEADER_LEN]) == (3, 6, 7, 2)


def test_a_response_is_magic_code_two_lengths_then_stdout_and_stderr() -> None:
    raw = wire.encode_response(1, b'{"code": 7}', b"oops")
    assert raw == struct.pack("<4sIII", b"PBR1", 1, 11, 4) + b'{"code": 7}' + b"oops"
    assert wire.decode_response_header(raw[:wire.RESPONSE_HEADER_LEN]) == (1, 11, 4)


@pytest.mark.parametrize("header", [
    b"",
    struct.pack("<4sIIII", b"PBR1", 0, 1, 1, 1),  # a response's magic
    struct.pack("<4sIIII", b"PBQ1", 0, 1, 1, 1)[:-1],  # one byte short
    struct.pack("<4sIIII", b"PBQ1", 0, wire.MAX_PROGRAM + 1, 0, 0),
    struct.pack("<4sIIII", b"PBQ1", 0, 1, wire.MAX_ENV + 1, 0),
    struct.pack("<4sIIII", b"PBQ1", 0, 1, 0, wire.MAX_STDIN + 1),
])
def test_a_bad_request_header_is_refused(header: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode_request_header(header)


@pytest.mark.parametrize("header", [b"PBR1", struct.pack("<4sIII", b"PBQ1", 0, 0, 0)])
def test_a_bad_response_header_is_refused(header: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode_response_header(header)


def test_env_pairs_keep_what_follows_the_first_equals_and_skip_the_rest() -> None:
    blob = b"CNI_ARGS=IP=10.0.0.5\0NOEQUALS\0=novalue\0EMPTY=\0BYTES=\xff"
    assert wire.decode_env(blob) == {"CNI_ARGS": "IP=10.0.0.5", "EMPTY": "", "BYTES": "\udcff"}


def test_the_client_is_built_with_these_constants() -> None:
    from cni_plugin.install import wire_defines

    defines = dict(flag[2:].split("=", 1) for flag in wire_defines())
    assert defines["WIRE_REQUEST"] == '"PBQ1"' and defines["WIRE_RESPONSE_HEADER_LEN"] == "16"
    assert defines["WIRE_ANSWER_TIMEOUT_MS"] == "330000" and defines["WIRE_MAX_STDIN"] == f"{(4 << 20) + 1}u"


def test_the_clients_error_answers_are_forwards() -> None:
    """client.c writes its own copies of the answers forward.py gives when the agent failed or was
    late (it has no Python to ask): they must say the same, byte for byte."""
    from cni_plugin.agent import forward

    source = (Path(wire.__file__).parent / "client.c").read_text()
    literal = r'"(?:[^"\\\n]|\\.)*"'
    constant = rf"static const char (AGENT_\w+)\[\] =\s*((?:{literal}\s*)+);"
    found = {name: b"".join(ast.literal_eval(part).encode() for part in re.findall(literal, body))
             for name, body in re.findall(constant, source)}
    assert found == {"AGENT_FAILED": forward.AGENT_FAILED, "AGENT_LATE": forward.AGENT_LATE}
