"""Forward one CNI call to the resident agent over its socket (wire.py), builtins only.

The exec'd shim and `pybridge doctor` both use it; `socket` and `json` would cost ~8 ms each
(enum, re), two thirds of a whole forwarded call.
"""

import _socket
import posix
import sys
import time

from . import wire

AGENT_FAILED = (b'{"code": 999, "msg": "pybridge agent failed while serving the call", '
                b'"details": "see the agent log; the call may have been partly done"}')
AGENT_LATE = (b'{"code": 999, "msg": "pybridge agent did not answer in time", '
              b'"details": "see the agent log; the call may have been partly done"}')


def read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = posix.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view):]


def _recv_exact(sock: _socket.socket, size: int, deadline: float) -> bytes:
    """`size` bytes, fewer if the agent closed; TimeoutError once `deadline` passed."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        _until(sock, deadline)
        chunk = sock.recv(min(size - got, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _until(sock: _socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)


def _answer_timeout(env: dict[bytes, bytes]) -> float:
    try:
        value = float(env.get(wire.ANSWER_TIMEOUT_ENV.encode(), b""))
    except ValueError:
        return wire.ANSWER_TIMEOUT
    return value if 0 < value < 86400 else wire.ANSWER_TIMEOUT


def _open_fds(env: dict[bytes, bytes]) -> tuple[list[int], int]:
    fds = [posix.open(b"/proc/thread-self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)]
    flags = 0
    netns = env.get(b"CNI_NETNS", b"")
    if netns:
        try:
            # O_PATH: never blocks on a FIFO nor opens a device; the agent checks it is a netns.
            fds.append(posix.open(netns, posix.O_PATH | posix.O_CLOEXEC))
            flags |= wire.FLAG_POD_NETNS
        except OSError:
            pass  # the agent reports the missing netns as the in-process code would
    # Our view of the files: the agent serves the call only if it sees the same (views.py).
    fds.append(posix.open(b"/", posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC))
    return fds, flags | wire.FLAG_ROOT


def forward(
    program: bytes, stdin: bytes, env: dict[bytes, bytes], path: bytes
) -> tuple[int, bytes, bytes] | None:
    """The agent's (exit code, stdout, stderr), or None if no agent took the call: it declined,
    went away or did not acknowledge within wire.ACK_TIMEOUT. Once it has, an answer that does
    not come within the answer deadline is an error, never a hang."""
    deadline = time.monotonic() + wire.ACK_TIMEOUT
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(wire.ACK_TIMEOUT)
        sock.connect(path)
    except OSError:
        return None
    fds, flags = _open_fds(env)
    accepted = False
    try:
        blob = b"\0".join(k + b"=" + v for k, v in env.items())
        request = wire.encode_request(program, blob, stdin, flags)
        ancillary = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        sent = sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, ancillary)])
        if sent < len(request):
            _until(sock, deadline)
            sock.sendall(request[sent:])
        if _recv_exact(sock, 4, deadline) != wire.ACCEPTED:
            return None  # declined, or gone before it accepted: nothing was done
        sock.sendall(wire.GO)  # if this fails, the agent never saw it and did nothing
        accepted = True
        deadline = time.monotonic() + _answer_timeout(env)
        header = _recv_exact(sock, wire.RESPONSE_HEADER_LEN, deadline)
        try:
            code, olen, elen = wire.decode_response_header(header)
        except ValueError:
            return 1, AGENT_FAILED, b""
        body = _recv_exact(sock, olen + elen, deadline)
        if len(body) != olen + elen:
            return 1, AGENT_FAILED, b""
        return code, body[:olen], body[olen:]
    except TimeoutError:
        return (1, AGENT_LATE, b"") if accepted else None
    except OSError:
        return (1, AGENT_FAILED, b"") if accepted else None
    finally:
        for fd in fds:
            posix.close(fd)
        sock.close()
