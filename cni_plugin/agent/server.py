"""`pybridge agent`: serves forwarded CNI calls with the libraries already loaded.

One thread per connection (bounded); each call runs the same `skel.run` as the exec'd plugin,
so results are identical. Host-side netlink sockets are opened by the serving thread, pod-side
work runs in a thread that entered the pod netns (netns.run_in): no thread of the agent ever
stays in another netns. IPAM locking is the on-disk flock, so agent and in-process calls mix.
"""

from __future__ import annotations

import array
import contextlib
import io
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .. import log, netns, skel
from ..removals import Removals
from . import activation, wire

MAX_CONCURRENT = 64
REQUEST_TIMEOUT = 10.0
ACCEPT_POLL = 0.5  # how soon an agent on systemd's socket notices a stop
_FD_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)


def _verbs_for(program: str) -> Callable[[], Mapping[str, skel.Verb]]:
    if program == "pyipam":
        from ipam.__main__ import verbs as ipam_verbs

        return ipam_verbs

    def bridge_verbs() -> Mapping[str, skel.Verb]:
        from ..verbs import VERBS

        return VERBS

    return bridge_verbs


def _recv_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The whole request and the fds that came with it; ValueError if it is not one."""
    fds: list[int] = []
    data = b""
    need = wire.HEADER_LEN
    header_done = False
    while len(data) < need:
        chunk, ancdata, _flags, _addr = conn.recvmsg(max(need - len(data), 1), _FD_SPACE if not fds else 0)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        if not chunk:
            break
        data += chunk
        if not header_done and len(data) >= wire.HEADER_LEN:
            _, plen, elen, slen = wire.decode_request_header(data[:wire.HEADER_LEN])
            need = wire.HEADER_LEN + plen + elen + slen
            header_done = True
    if len(data) < need or not header_done:
        for fd in fds:
            os.close(fd)
        raise ValueError("truncated request")
    return data, fds


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Agent:
    def __init__(self, path: str = wire.DEFAULT_SOCKET, max_concurrent: int = MAX_CONCURRENT) -> None:
        self.path = path
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._inflight: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._inherited = False
        self._defaults = {k: v for k, v in os.environ.items() if k == log.ENV_VAR}
        self.removals = Removals()
        # Calls for one attachment run one at a time, calls for others in parallel: see _answer.
        self._keys_lock = threading.Lock()
        self._attachments: dict[tuple[str, str], tuple[threading.Lock, list[int]]] = {}

    def bind(self) -> None:
        inherited = activation.inherited_socket()
        if inherited is not None:
            # systemd's socket stays bound and listening after we exit: never shut it down nor
            # unlink it; accept wakes up now and then to see a stop instead.
            inherited.settimeout(ACCEPT_POLL)
            self._sock, self._inherited = inherited, True
            return
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a previous agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: root only
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(128)
        self._sock = sock

    def serve_forever(self) -> None:
        assert self._sock is not None, "bind() first"
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            self._slots.acquire()
            thread = threading.Thread(target=self._serve_one, args=(conn,), daemon=True)
            with self._lock:
                self._inflight.add(thread)
            thread.start()
        if self._inherited:
            self._sock.close()  # our copy only: systemd keeps the socket for the next agent

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, then wait for the calls already accepted."""
        self._stopping.set()
        if self._sock is not None and not self._inherited:  # serve_forever closes systemd's
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with self._lock:
            pending = list(self._inflight)
        for thread in pending:
            thread.join(drain_timeout)
        self.removals.drain(drain_timeout)

    def _serve_one(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            if _peer_uid(conn) not in (0, os.getuid()):
                return
            data, fds = _recv_request(conn)
            self._answer(conn, data, fds)
        except (OSError, ValueError) as exc:
            log.warning("agent_bad_request", error=str(exc))
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()
            with self._lock:
                self._inflight.discard(threading.current_thread())
            self._slots.release()

    @contextlib.contextmanager
    def _attachment(self, key: tuple[str, str]) -> Iterator[None]:
        """Hold the lock of one (container id, ifname); dropped once no call holds or awaits it."""
        with self._keys_lock:
            lock, users = self._attachments.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._keys_lock:
                users[0] -= 1
                if not users[0]:
                    del self._attachments[key]

    def _answer(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        flags, plen, elen, _slen = wire.decode_request_header(data[:wire.HEADER_LEN])
        body = data[wire.HEADER_LEN:]
        program = body[:plen].decode(errors="replace")
        # The agent's own log file serves calls whose runtime set none (the systemd unit sets one).
        env = {**self._defaults, **wire.decode_env(body[plen:plen + elen])}
        stdin = body[plen + elen:]
        pod_fd = fds[1] if flags & wire.FLAG_POD_NETNS and len(fds) > 1 else None
        # The agent does host-side work in its own netns: serve only clients in that netns.
        if not fds or not netns.same_netns(fds[0]) or program not in ("pybridge", "pyipam"):
            conn.sendall(wire.DECLINED)
            return
        conn.sendall(wire.ACCEPTED)
        # An exec'd plugin killed mid-ADD stops working; the agent serving its call does not. So
        # calls for one attachment are serialized (the runtime's DEL after the kill waits for the
        # ADD), and an ADD whose caller is gone is undone: no one will ever learn its result.
        key = (env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", ""))
        with self._attachment(key):
            out, err = io.StringIO(), io.StringIO()
            code = skel.run(_verbs_for(program), env, io.BytesIO(stdin), out, program=program,
                            stderr=err, netns_fd=pod_fd, removals=self.removals)
            try:
                conn.sendall(wire.encode_response(code, out.getvalue().encode(), err.getvalue().encode()))
            except OSError:
                if code == 0 and env.get("CNI_COMMAND") == "ADD":
                    log.warning("agent_add_undone", container_id=key[0], ifname=key[1],
                                reason="the caller went away before the result was delivered")
                    skel.run(_verbs_for(program), {**env, "CNI_COMMAND": "DEL"}, io.BytesIO(stdin),
                             io.StringIO(), program=program, stderr=io.StringIO(), netns_fd=pod_fd,
                             removals=self.removals)
                raise


def run(path: str | None = None) -> int:
    """Foreground agent; SIGTERM/SIGINT stop it after draining the calls in flight."""
    agent = Agent(path or os.environ.get(wire.SOCKET_ENV) or wire.DEFAULT_SOCKET)

    def stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=agent.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _preload()
    try:
        agent.bind()  # the socket appears once the agent is ready to serve
    except ValueError as exc:  # a socket handed over (systemd) that cannot be served
        print(f"pybridge agent: {exc}", file=sys.stderr)
        return 2
    agent.serve_forever()
    agent.stop()
    return 0


def _preload() -> None:
    """Import what calls need now, not during the first pod's ADD."""
    import importlib

    for module in ("ipam.plugin", "ipam.__main__", "cni_plugin.masq", "cni_plugin.verbs"):
        importlib.import_module(module)
    from ipam import disk

    disk.keep_indexes()  # long-lived: index the IPAM stores rather than read them whole per ADD
