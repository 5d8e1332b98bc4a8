"""`pybridge agent`: serves forwarded CNI calls with the libraries already loaded.

A fixed pool of serving threads, one call each at a time; each call runs the same `skel.run` as
the exec'd plugin, so results are identical. Host-side netlink sockets are opened by the serving
thread, pod-side work runs in a thread that entered the pod netns (netns.run_in): no thread of
the agent ever stays in another netns. IPAM locking is the on-disk flock, so agent and
in-process calls mix. Calls take turns (cnikit/turns.py): two do their work at once.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from cnikit import log, programs, skel
from cnikit.inflight import InFlight
from cnikit.removals import Removals
from cnikit.spec import version
from cnikit.spec.errors import TRY_AGAIN_LATER, CNIError
from cnikit.turns import Turns

from .. import netns, placement
from . import activation, views, wire
from .intake import REQUEST_TIMEOUT, Incoming, Intake, close_all, decline, raise_fd_limit
from .observer import Endpoint, Observer, Silent, result_code

MAX_CONCURRENT = 64
# A call waits this long for an earlier call on the same attachment, as the IPAM lock's default.
ATTACHMENT_TIMEOUT = 10.0
# Calls doing their work at once (one in Python while the other is in the kernel; cnikit/turns.py),
# and how long a call waits for its turn before it goes ahead without one.
AT_ONCE = 2
TURN_PATIENCE = 1.0
# The node agent's socket for a new pod's addresses (placement.py), next to the agent's own.
PLACEMENT = "netpol.sock"


def _verbs_for(program: str) -> Callable[[], Mapping[str, skel.Verb]]:
    """The program's verb table, imported when its first call is served."""
    if program == programs.PYIPAM:
        def ipam_verbs() -> Mapping[str, skel.Verb]:
            from ipam.verbs import VERBS

            return VERBS

        return ipam_verbs

    def bridge_verbs() -> Mapping[str, skel.Verb]:
        from ..verbs import VERBS

        return VERBS

    return bridge_verbs


class Agent:
    def __init__(self, path: str = wire.DEFAULT_SOCKET, max_concurrent: int = MAX_CONCURRENT,
                 observer: Observer | None = None) -> None:
        self.path = path
        self.observer: Observer = observer or Silent()
        self._slots = threading.BoundedSemaphore(max_concurrent)
        # Serving threads are started once and reused: a thread start from the intake waits
        # for the new thread to run, ~1.6 ms (up to 11) per call when 32 calls arrive at once.
        self._queue: queue.SimpleQueue[Incoming | None] = queue.SimpleQueue()
        self._servers = [threading.Thread(target=self._serve_queue, name="serve", daemon=True)
                         for _ in range(max_concurrent)]
        self._calls = InFlight()
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._inherited = False
        self._defaults = {k: v for k, v in os.environ.items() if k == log.ENV_VAR}
        self.removals = Removals()
        self._turns = Turns(AT_ONCE, TURN_PATIENCE)
        # Calls for one attachment run one at a time, calls for others in parallel: see _answer.
        self._keys_lock = threading.Lock()
        self._attachments: dict[tuple[str, str], tuple[threading.Lock, list[int]]] = {}

    def bind(self) -> None:
        inherited = activation.inherited_socket()
        if inherited is not None:
            # systemd's socket stays bound and listening after we exit: never shut it down nor
            # unlink it (the intake sees a stop within a second anyway).
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
        sock.listen(1024)  # bursts of connects must not find it full (the client would not wait)
        self._sock = sock

    def listening(self) -> bool:
        return self._sock is not None and not self._stopping.is_set() and os.path.exists(self.path)

    def serve_forever(self) -> None:
        assert self._sock is not None, "bind() first"
        for thread in self._servers:
            thread.start()
        Intake(self._sock, self._start, self._stopping).run()  # returns at once after a stop
        if self._inherited:
            self._sock.close()  # our copy only: systemd keeps the socket for the next agent

    def _start(self, call: Incoming) -> None:
        """Hand a whole request to a serving thread; with every slot busy, decline it (the
        caller serves it itself) rather than make anyone wait."""
        if not self._slots.acquire(blocking=False):
            self._decline(call)
            return
        self._calls.started()
        self._queue.put(call)

    def _decline(self, call: Incoming) -> None:
        self.observer.declined()
        close_all(call.fds)
        decline(call.conn)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, then wait for the calls already accepted."""
        self._stopping.set()
        if self._sock is not None and not self._inherited:  # serve_forever closes systemd's
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._calls.drain(drain_timeout)
        for _ in self._servers:
            self._queue.put(None)
        self.removals.drain(drain_timeout)

    def _serve_queue(self) -> None:
        while (call := self._queue.get()) is not None:
            self._serve_one(call)

    def _serve_one(self, call: Incoming) -> None:
        try:
            call.conn.setblocking(True)
            self._answer(call.conn, bytes(call.data), call.fds, call.deadline)
        except (OSError, ValueError) as exc:
            log.process().warning("agent_bad_request", error=str(exc))
        except Exception as exc:  # a bug must not take a serving thread with it
            log.process().exception("agent_internal_error", error=str(exc))
        finally:
            call.close()
            self._calls.finished()
            self._slots.release()

    @contextlib.contextmanager
    def _attachment(self, key: tuple[str, str]) -> Iterator[bool]:
        """Hold the lock of one (container id, ifname), waiting at most ATTACHMENT_TIMEOUT;
        yields whether it is held. Dropped once no call holds or awaits it."""
        with self._keys_lock:
            lock, users = self._attachments.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        held = lock.acquire(timeout=ATTACHMENT_TIMEOUT)
        try:
            yield held
        finally:
            if held:
                lock.release()
            with self._keys_lock:
                users[0] -= 1
                if not users[0]:
                    del self._attachments[key]

    def _answer(self, conn: socket.socket, data: bytes, fds: list[int], deadline: float) -> None:
        flags, plen, elen, _slen = wire.decode_request_header(data[:wire.HEADER_LEN])
        body = data[wire.HEADER_LEN:]
        program = body[:plen].decode(errors="replace")
        caller_env = wire.decode_env(body[plen:plen + elen])
        # The agent's own log file serves calls whose runtime set none (the systemd unit sets one).
        env = {**self._defaults, **caller_env}
        stdin = body[plen + elen:]
        pod_fd, root_fd = _passed_fds(flags, fds)
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        # The agent does host-side work in its own netns and opens files in its own mount
        # namespace: serve only clients in that netns that see the same files (views.py).
        if not fds or not netns.same_netns(fds[0]) or program not in programs.PROGRAMS \
                or root_fd is None or not views.caller_sees_the_same(root_fd, stdin, caller_env):
            self.observer.declined()
            conn.sendall(wire.DECLINED)
            return
        conn.sendall(wire.ACCEPTED)
        if not _go(conn):
            return  # the client's deadline passed: it serves the call itself
        conn.settimeout(REQUEST_TIMEOUT)  # for the answer: a client that never reads it
        # An exec'd plugin killed mid-ADD stops working; the agent serving its call does not. So
        # calls for one attachment are serialized (the runtime's DEL after the kill waits for the
        # ADD), and an ADD whose caller is gone is undone: no one will ever learn its result.
        key = (env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", ""))
        with self._attachment(key) as held:
            if not held:
                conn.sendall(_busy(stdin, key))
                return
            out, err = io.StringIO(), io.StringIO()
            started = time.monotonic()
            self.observer.call_started()
            code = 1
            try:
                code = self._run(program, env, stdin, out, err, pod_fd)
            finally:
                self.observer.call_finished(program, env.get("CNI_COMMAND", ""),
                                            result_code(code, out.getvalue()), time.monotonic() - started)
            if code == 0 and env.get("CNI_COMMAND") == "ADD" and program == programs.PYBRIDGE:
                placement.after_add(env, out.getvalue(), os.path.join(os.path.dirname(self.path), PLACEMENT))
            try:
                conn.sendall(wire.encode_response(code, out.getvalue().encode(), err.getvalue().encode()))
            except OSError:
                if code == 0 and env.get("CNI_COMMAND") == "ADD":
                    self.observer.add_undone()
                    log.process().warning("agent_add_undone", container_id=key[0], ifname=key[1],
                                reason="the caller went away before the result was delivered")
                    self._run(program, {**env, "CNI_COMMAND": "DEL"}, stdin, io.StringIO(), io.StringIO(),
                              pod_fd)
                raise

    def _run(self, program: str, env: Mapping[str, str], stdin: bytes, out: io.StringIO,
             err: io.StringIO, pod_fd: int | None) -> int:
        """One verb through the same skel as the exec'd plugin, in a turn of its own."""
        with self._turns.turn() as held:
            if not held:
                self.observer.ran_without_turn()
            return skel.run(_verbs_for(program), env, io.BytesIO(stdin), out, program=program, stderr=err,
                            netns_fd=pod_fd, removals=self.removals)


def _passed_fds(flags: int, fds: list[int]) -> tuple[int | None, int | None]:
    """(pod netns fd, caller's root directory fd) from what came after the client's netns fd."""
    rest = iter(fds[1:])
    pod_fd = next(rest, None) if flags & wire.FLAG_POD_NETNS else None
    root_fd = next(rest, None) if flags & wire.FLAG_ROOT else None
    return pod_fd, root_fd


def _go(conn: socket.socket) -> bool:
    """Did the client confirm it waits for the answer (wire.GO)?"""
    got = b""
    while len(got) < len(wire.GO):
        chunk = conn.recv(len(wire.GO) - len(got))
        if not chunk:
            break
        got += chunk
    if got != wire.GO:
        log.process().warning("agent_call_dropped", reason="the client did not confirm the call")
    return got == wire.GO


def _busy(stdin: bytes, key: tuple[str, str]) -> bytes:
    """The answer to a call whose attachment stayed busy: code 11, try again later."""
    try:
        cni_version = skel.config_version(skel.decode_config(stdin))
    except CNIError:
        cni_version = version.CURRENT
    error = CNIError(TRY_AGAIN_LATER, "another call on this attachment is still running",
                     f"container {key[0]!r}, ifname {key[1]!r}: waited {ATTACHMENT_TIMEOUT:g}s")
    return wire.encode_response(1, error.to_json(cni_version).encode(), b"")


def run(path: str | None, observer: Observer | None, endpoint: Endpoint) -> int:
    """Foreground agent; SIGTERM/SIGINT stop it after draining the calls in flight."""
    try:
        log.open_process_log(os.environ)  # created now, not at the first call that logs
    except CNIError as exc:
        print(f"pybridge agent: {exc}", file=sys.stderr)
        return 2
    agent = Agent(path or os.environ.get(wire.SOCKET_ENV) or wire.DEFAULT_SOCKET, observer=observer)

    def stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=agent.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _preload()
    raise_fd_limit()
    try:
        agent.bind()  # the socket appears once the agent is ready to serve
    except ValueError as exc:  # a socket handed over (systemd) that cannot be served
        print(f"pybridge agent: {exc}", file=sys.stderr)
        return 2
    endpoint.ready_when(agent.listening)
    agent.serve_forever()
    agent.stop()
    endpoint.close()
    return 0


def _preload() -> None:
    """Import what calls need now, not during the first pod's ADD."""
    import importlib

    for module in ("ipam.plugin", "ipam.verbs", "cni_plugin.masq", "cni_plugin.verbs"):
        importlib.import_module(module)
    from ipam import disk

    disk.keep_indexes()  # long-lived: index the IPAM stores rather than read them whole per ADD
    netns.prestart()
