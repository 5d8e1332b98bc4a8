"""Broken and hostile peers of the agent, speaking (or mangling) its protocol by hand."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cni_plugin.agent import wire
from testbed.harness import Host

_libc = ctypes.CDLL(None, use_errno=True)


def host_netns_fd(host: Host) -> int:
    """The host netns as an fd: the agent serves only clients that send its own netns."""
    return os.open(f"/run/netns/{host.name}", os.O_RDONLY | os.O_CLOEXEC)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    for _ in range(100):
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:  # a full backlog: the agent is accepting a burst
            time.sleep(0.01)
    s.close()
    raise TimeoutError(f"{path}: backlog full for 1 s")


def send_with_fds(s: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, ancillary)])


def version_by_agent(path: Path, own_fd: int) -> bool:
    """A VERSION call the agent itself answers (ACCEPTED, GO, RESPONSE)?"""
    request = wire.encode_request(b"pybridge", b"CNI_COMMAND=VERSION", b"{}", wire.FLAG_ROOT)
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with connect(path) as s:
            send_with_fds(s, request, [own_fd, root])
            if s.recv(4) != wire.ACCEPTED:
                return False
            s.sendall(wire.GO)
            reply = b"".join(iter(lambda: s.recv(65536), b""))
    except OSError:
        return False
    finally:
        os.close(root)
    return reply[:4] == wire.RESPONSE and b"supportedVersions" in reply


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


class SlowPeers:
    """`count` connections held open in the background, each having sent a request header (and
    `fds`) announcing a 64 KiB body: half then stall, half trickle one byte of it a second.
    Whichever the agent closes is opened again, so `count` slow peers stay on it."""

    def __init__(self, path: Path, count: int, fds: list[int]) -> None:
        self.path, self.count, self.fds = path, count, fds
        self.reopened = 0
        self.reopened_tricklers = 0
        self._stop = threading.Event()
        self._socks: list[tuple[socket.socket, bool]] = []
        for i in range(count):
            self._socks.append(self._open(trickle=bool(i % 2)))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self, trickle: bool) -> tuple[socket.socket, bool]:
        s = connect(self.path)
        send_with_fds(s, wire.encode_request(b"pybridge", bytes(1 << 16), b"", 0)[:wire.HEADER_LEN], self.fds)
        s.setblocking(False)
        return s, trickle

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for i, (s, trickle) in enumerate(self._socks):
                try:
                    if s.recv(16) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    self._socks[i] = self._open(trickle)
                    self.reopened += 1
                    self.reopened_tricklers += trickle
                    continue
                if trickle:
                    with contextlib.suppress(OSError):
                        s.send(b"\0")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s, _ in self._socks:
            s.close()


def timed_call(client: Path, netns_fd: int, env: dict[str, str], stdin: bytes,
               timeout: float = 60) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Exec `client` in the netns of `netns_fd` (setns in the child: no `ip netns exec` in the
    time) and return (seconds, process)."""

    def enter() -> None:
        if _libc.setns(netns_fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    started = time.monotonic()
    proc = subprocess.run([str(client)], input=stdin, capture_output=True, env=env, timeout=timeout,
                          preexec_fn=enter, pass_fds=(netns_fd,))
    return time.monotonic() - started, proc
