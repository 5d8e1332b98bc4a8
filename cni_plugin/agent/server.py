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
from cnikit.spec.errors import CNIError
from cnikit.turns import Turns
from ipam.index import Indexes

from .. import link, netns, placement
from ..host import Host, Kernel
from . import activation, wire
from .call import Call, admissible, busy, unframe
from .intake import REQUEST_TIMEOUT, Incoming, Intake, close_all, decline, raise_fd_limit
from .observer import Endpoint, Observer, Silent, result_code

MAX_CONCURRENT = 64
# A call waits this long for an earlier call on the same attachment, as the IPAM lock's default.
ATTACHMENT_TIMEOUT = 10.0
# Calls doing their work at once (one in Python while the other is in the kernel; cnikit/turns.py),
# and how long a call waits for its turn before it goes ahead without one.
AT_ONCE = 2
TURN_PATIENCE = 1.0
# The node controller's socket for a new pod's addresses (placement.py), next to the agent's own.
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
                 observer: Observer | None = None, ipam_indexes: Indexes | None = None,
                 host: Host | None = None) -> None:
        """`ipam_indexes`: pyipam's store indexes, kept across calls (ipam/index.py); None: the
        calls read their stores whole, as one-shot calls do. `host`: the kernel to every call,
        kept across them (host.py); None: each call makes its own."""
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
        self.ipam_indexes = ipam_indexes
        self.host = host
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
    def _attachment(self, key: tuple[str, str], timeout: float = ATTACHMENT_TIMEOUT) -> Iterator[bool]:
        """Hold the lock of one (container id, ifname), waiting at most `timeout`; yields
        whether it is held. Dropped once no call holds or awaits it."""
        with self._keys_lock:
            lock, users = self._attachments.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        held = lock.acquire(timeout=timeout)
        try:
            yield held
        finally:
            if held:
                lock.release()
            with self._keys_lock:
                users[0] -= 1
                if not users[0]:
                    del self._attachments[key]

    def attachments_in_flight(self) -> set[tuple[str, str]]:
        """(container id, ifname) of every call holding or awaiting its attachment's lock."""
        with self._keys_lock:
            return set(self._attachments)

    def run_alone(self, key: tuple[str, str], env: Mapping[str, str], stdin: bytes) -> tuple[int, str] | None:
        """One pybridge verb as a served call runs it (the attachment's lock, a turn), for the
        collector (ops/collector.py); None, and nothing run, while a call holds or awaits that
        lock or the agent stops."""
        if self._stopping.is_set():
            return None
        self._calls.started()
        try:
            with self._attachment(key, timeout=0) as held:
                if not held:
                    return None
                out, env = io.StringIO(), {**self._defaults, **env}
                code = self._run(programs.PYBRIDGE, env, stdin, out, io.StringIO(), None)
                return code, out.getvalue()
        finally:
            self._calls.finished()

    def _answer(self, conn: socket.socket, data: bytes, fds: list[int], deadline: float) -> None:
        call = unframe(data, fds, self._defaults)
        if not self._accepted(conn, call, deadline):
            return
        # An exec'd plugin killed mid-ADD stops working; the agent serving its call does not. So
        # calls for one attachment are serialized (the runtime's DEL after the kill waits for the
        # ADD), and an ADD whose caller is gone is undone (_deliver).
        with self._attachment(call.attachment) as held:
            if not held:
                conn.sendall(busy(call, ATTACHMENT_TIMEOUT))
                return
            code, out, err = self._dispatch(call)
            self._deliver(conn, call, code, out, err)
            if code == 0 and call.command == "ADD" and call.program == programs.PYBRIDGE:
                # Once the runtime has its answer: the ADD never waits for the placement
                # (docs/networkpolicy.md), and an ADD undone for want of a caller is not announced.
                placement.after_add(call.env, out, os.path.join(os.path.dirname(self.path), PLACEMENT))

    def _accepted(self, conn: socket.socket, call: Call, deadline: float) -> bool:
        """The handshake, within the client's deadline: decline a call the agent may not serve,
        else accept it and wait for the client's go. Then the answer has REQUEST_TIMEOUT to go
        out (a client that never reads it)."""
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        if not admissible(call):
            self.observer.declined()
            conn.sendall(wire.DECLINED)
            return False
        conn.sendall(wire.ACCEPTED)
        if not _go(conn):
            return False  # the client's deadline passed: it serves the call itself
        conn.settimeout(REQUEST_TIMEOUT)
        return True

    def _dispatch(self, call: Call) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of the call, counted and timed by the observer."""
        out, err = io.StringIO(), io.StringIO()
        started = time.monotonic()
        self.observer.call_started()
        code = 1
        try:
            code = self._run(call.program, call.env, call.stdin, out, err, call.pod_fd, call.config)
        finally:
            self.observer.call_finished(call.program, call.command, result_code(code, out.getvalue()),
                                        time.monotonic() - started)
        return code, out.getvalue(), err.getvalue()

    def _deliver(self, conn: socket.socket, call: Call, code: int, out: str, err: str) -> None:
        """Send the answer; an ADD that succeeded for a caller gone away is undone, since no one
        will ever learn its result."""
        try:
            conn.sendall(wire.encode_response(code, out.encode(), err.encode()))
        except OSError:
            if code == 0 and call.command == "ADD":
                self._undo(call)
            raise

    def _undo(self, call: Call) -> None:
        self.observer.add_undone()
        container_id, ifname = call.attachment
        log.process().warning("agent_add_undone", container_id=container_id, ifname=ifname,
                              reason="the caller went away before the result was delivered")
        self._run(call.program, {**call.env, "CNI_COMMAND": "DEL"}, call.stdin, io.StringIO(), io.StringIO(),
                  call.pod_fd, call.config)

    def _run(self, program: str, env: Mapping[str, str], stdin: bytes, out: io.StringIO,
             err: io.StringIO, pod_fd: int | None, decoded: dict[str, Any] | None = None) -> int:
        """One verb through the same skel as the exec'd plugin, in a turn of its own; `decoded`:
        stdin as unframe decoded it (skel.run decodes it only when None)."""
        with self._turns.turn() as held:
            if not held:
                self.observer.ran_without_turn()
            return skel.run(_verbs_for(program), env, io.BytesIO(stdin), out, program=program, stderr=err,
                            netns_fd=pod_fd, removals=self.removals, ipam_indexes=self.ipam_indexes,
                            ipam_gc_released=self.observer.ipam_released, host=self.host,
                            decoded=decoded)


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


def run(path: str | None, observer: Observer | None, endpoint: Endpoint,
        bound: Callable[[Agent], None] | None = None) -> int:
    """Foreground agent; SIGTERM/SIGINT stop it after draining the calls in flight. `bound` is
    called with the agent once its socket is bound (the collector starts there)."""
    try:
        log.open_process_log(os.environ)  # created now, not at the first call that logs
    except CNIError as exc:
        print(f"pybridge agent: {exc}", file=sys.stderr)
        return 2
    # Long-lived: index the IPAM stores rather than read them whole per ADD.
    kernel = Kernel()
    agent = Agent(path or os.environ.get(wire.SOCKET_ENV) or wire.DEFAULT_SOCKET, observer=observer,
                  ipam_indexes=Indexes(), host=kernel)

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
    agent.removals.submit(link.sweeper(kernel))  # what an agent that died left marked (link.py)
    agent.removals.submit(kernel.port_check_sweep)  # and its source-check teardowns (then: ports gone)
    if bound is not None:
        bound(agent)
    agent.serve_forever()
    agent.stop()
    endpoint.close()
    return 0


def _preload() -> None:
    """Import what calls need now, not during the first pod's ADD."""
    import importlib

    for module in ("ipam.plugin", "ipam.verbs", "cni_plugin.masq", "cni_plugin.verbs"):
        importlib.import_module(module)
    netns.prestart()
