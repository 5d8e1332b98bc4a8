"""The agent protocol, in bytes only, so the exec'd client needs no import beyond builtins.

client -> agent: REQUEST header + program + env ("K=V" joined by NUL) + stdin, with the
                 client's own netns fd, the pod netns fd if it could open it (FLAG_POD_NETNS)
                 and its root directory (FLAG_ROOT, O_PATH), in that order, attached as
                 SCM_RIGHTS to the first message.
agent -> client: ACCEPTED, or DECLINED.
client -> agent: GO, only if ACCEPTED came within the client's acknowledgement deadline.
agent -> client: RESPONSE header + stdout + stderr.
The agent works on a call only once GO came: a client whose deadline passed closes instead and
serves the call itself, and a call is never served twice. An agent that closes or declines
before GO did nothing; after GO the agent owns the call and its failure is the runtime's error.
"""

REQUEST = b"PBQ1"
ACCEPTED = b"PBK1"
DECLINED = b"PBN1"
GO = b"PBG1"
RESPONSE = b"PBR1"

FLAG_POD_NETNS = 1
FLAG_ROOT = 2
MAX_FDS = 3
HEADER_LEN = 20  # magic + flags + len(program) + len(env) + len(stdin)
RESPONSE_HEADER_LEN = 16  # magic + exit code + len(stdout) + len(stderr)

MAX_PROGRAM = 64
MAX_ENV = 1 << 20
MAX_STDIN = (4 << 20) + 1

DEFAULT_SOCKET = "/run/pybridge/agent.sock"
SOCKET_ENV = "PYBRIDGE_AGENT_SOCKET"

# Client deadlines (seconds). Acknowledged late: the client serves the call itself. Answered
# late: an error, never a hang; the longest legitimate call waits for its attachment (10 s)
# and the IPAM lock (lockTimeout, at most 300 s). ANSWER_TIMEOUT_ENV overrides it.
ACK_TIMEOUT = 2.0
ANSWER_TIMEOUT = 330.0
ANSWER_TIMEOUT_ENV = "PYBRIDGE_AGENT_ANSWER_TIMEOUT"


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def read_u32(buf: bytes, offset: int) -> int:
    return int.from_bytes(buf[offset:offset + 4], "little")


def encode_request(program: bytes, env: bytes, stdin: bytes, flags: int) -> bytes:
    return REQUEST + u32(flags) + u32(len(program)) + u32(len(env)) + u32(len(stdin)) + program + env + stdin


def decode_request_header(header: bytes) -> tuple[int, int, int, int]:
    """(flags, program length, env length, stdin length); ValueError on anything off."""
    if len(header) != HEADER_LEN or header[:4] != REQUEST:
        raise ValueError("not a pybridge request")
    flags, plen, elen, slen = (read_u32(header, i) for i in (4, 8, 12, 16))
    if plen > MAX_PROGRAM or elen > MAX_ENV or slen > MAX_STDIN:
        raise ValueError("request too large")
    return flags, plen, elen, slen


def encode_response(code: int, stdout: bytes, stderr: bytes) -> bytes:
    return RESPONSE + u32(code) + u32(len(stdout)) + u32(len(stderr)) + stdout + stderr


def decode_response_header(header: bytes) -> tuple[int, int, int]:
    """(exit code, stdout length, stderr length); ValueError on anything off."""
    if len(header) != RESPONSE_HEADER_LEN or header[:4] != RESPONSE:
        raise ValueError("not a pybridge response")
    return read_u32(header, 4), read_u32(header, 8), read_u32(header, 12)


def decode_env(blob: bytes) -> dict[str, str]:
    env = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    return env
