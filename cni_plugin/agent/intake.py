"""The agent's front door: accept connections and receive whole requests, never blocking.

One thread runs a selector over the listening socket and every connection whose request is
still arriving. A connection costs a buffer and its fds, not a serving thread, so clients that
stall or trickle cannot hold the agent's serving slots; each has a deadline for its whole
request. Only complete requests are handed on. Every fd received is closed on every path, and
running out of fds (EMFILE, ENFILE) pauses accepting for a moment instead of ending the agent.
With too many requests arriving at once, the oldest unfinished one is dropped for the new one.
"""

from __future__ import annotations

import array
import contextlib
import os
import resource
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cnikit import log

from . import wire

REQUEST_TIMEOUT = 10.0  # from accept to the request's last byte
ACCEPT_BACKOFF = 0.1  # out of fds: stop accepting this long, then try again
_FD_SPACE = socket.CMSG_SPACE(wire.MAX_FDS * array.array("i").itemsize)


def max_pending() -> int:
    """Connections whose request is arriving, each holding up to 4 fds: a quarter of the fd limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(8, min(1024, soft // (4 * (wire.MAX_FDS + 1))))


def raise_fd_limit() -> None:
    """The soft fd limit up to the hard one (as Go programs do at start): room for more
    connections before the oldest unfinished request is dropped."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Incoming:
    """A connection whose request is still arriving; it owns `fds` until handed on."""

    conn: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    need: int = wire.HEADER_LEN
    header_done: bool = False

    def receive(self) -> bool:
        """Take what has arrived; True once the request is whole. ValueError if it is not one."""
        try:
            chunk, ancdata, _flags, _addr = self.conn.recvmsg(self.need - len(self.data), _FD_SPACE)
        except BlockingIOError:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                self.fds.extend(array.array("i", payload[:usable]))
        if not chunk:
            raise ValueError("truncated request")
        self.data += chunk
        if not self.header_done and len(self.data) >= wire.HEADER_LEN:
            _, plen, elen, slen = wire.decode_request_header(bytes(self.data[:wire.HEADER_LEN]))
            self.need = wire.HEADER_LEN + plen + elen + slen
            self.header_done = True
        return self.header_done and len(self.data) >= self.need

    def close(self) -> None:
        close_all(self.fds)
        self.conn.close()


def close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def decline(conn: socket.socket) -> None:
    """Tell the client to serve the call itself; never waits on it."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(wire.DECLINED)
    conn.close()


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


Handler = Callable[[Incoming], None]


class Intake:
    """Runs until `stopping` is set; hands each whole request to `handle` (which then owns it)."""

    def __init__(self, sock: socket.socket, handle: Handler, stopping: threading.Event) -> None:
        self._sock = sock
        self._handle = handle
        self._stopping = stopping
        self._selector = selectors.DefaultSelector()
        self._incoming: dict[socket.socket, Incoming] = {}
        self._limit = max_pending()
        self._paused_until = 0.0

    def run(self) -> None:
        try:
            self._sock.setblocking(False)
            self._selector.register(self._sock, selectors.EVENT_READ)
        except (OSError, ValueError):
            if self._stopping.is_set():
                return  # a stop closed the socket before the intake started
            raise
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(self._wait()):
                    if key.fileobj is self._sock:
                        self._accept()
                    else:
                        self._receive(self._incoming[key.fileobj])  # type: ignore[index]
                self._expire()
                self._resume()
        finally:
            for incoming in list(self._incoming.values()):
                self._drop(incoming)
            self._selector.close()

    def _wait(self) -> float:
        """Until the next deadline or resume, at most 1 s (so a stop is seen)."""
        now = time.monotonic()
        wake = min([i.deadline for i in self._incoming.values()] + [now + 1.0])
        if self._paused_until:
            wake = min(wake, self._paused_until)
        return max(0.0, wake - now)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if self._stopping.is_set():
                return  # stop() shut the socket down
            # Out of fds (EMFILE, ENFILE) or memory, or anything else: pause, never end.
            log.process().warning("agent_accept_paused", error=str(exc), seconds=ACCEPT_BACKOFF)
            self._selector.unregister(self._sock)
            self._paused_until = time.monotonic() + ACCEPT_BACKOFF
            return
        try:
            trusted = peer_uid(conn) in (0, os.getuid())
        except OSError:
            trusted = False
        if not trusted:
            conn.close()
            return
        if len(self._incoming) >= self._limit:
            # A real client sends its request at once: the oldest unfinished one is the slowest.
            self._drop(min(self._incoming.values(), key=lambda i: i.deadline))
        conn.setblocking(False)
        incoming = Incoming(conn, time.monotonic() + REQUEST_TIMEOUT)
        self._incoming[conn] = incoming
        self._selector.register(conn, selectors.EVENT_READ)

    def _receive(self, incoming: Incoming) -> None:
        try:
            whole = incoming.receive()
        except (OSError, ValueError) as exc:
            log.process().warning("agent_bad_request", error=str(exc))
            self._drop(incoming)
            return
        if whole:
            self._forget(incoming)
            self._handle(incoming)

    def _expire(self) -> None:
        now = time.monotonic()
        for incoming in [i for i in self._incoming.values() if i.deadline <= now]:
            log.process().warning("agent_bad_request", error="request not received in time")
            self._drop(incoming)

    def _resume(self) -> None:
        if self._paused_until and time.monotonic() >= self._paused_until and not self._stopping.is_set():
            self._paused_until = 0.0
            self._selector.register(self._sock, selectors.EVENT_READ)

    def _forget(self, incoming: Incoming) -> None:
        self._selector.unregister(incoming.conn)
        del self._incoming[incoming.conn]

    def _drop(self, incoming: Incoming) -> None:
        self._forget(incoming)
        incoming.close()
