"""systemd socket activation (sd_listen_fds(3)): with conf/pybridge-agent.socket, systemd binds
the agent's socket and starts the agent on the first call, passing the listening socket as fd 3.
That first call waits in the socket's queue for the agent instead of being served in-process,
and the socket outlives the agent: calls made while it restarts wait for the next one."""

from __future__ import annotations

import os
import socket

LISTEN_FDS_START = 3
_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_socket() -> socket.socket | None:
    """The listening unix socket passed to this process, or None if none was."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in _ENV:  # meant for this process only, never for what it spawns
        os.environ.pop(name, None)
    if count != "1":
        raise ValueError(f"LISTEN_FDS={count!r}: the agent takes exactly one socket")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as exc:
        raise ValueError(f"fd {LISTEN_FDS_START} is not a socket: {exc.strerror}") from exc
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ValueError(f"fd {LISTEN_FDS_START} is not a listening unix stream socket")
    sock.set_inheritable(False)
    return sock
