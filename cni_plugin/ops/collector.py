"""Collection of what the runtime forgot: no runtime calls CNI GC (containerd 1.6-2.x, podman),
so an attachment whose DEL never came (runtime crash, wiped runtime state, a chained plugin's
failing DEL) keeps its address, masquerade rule and cache entry forever unless we release it.

The signal is the kernel's, never the API's pod IPs: an attachment is dead when its netns path
(pybridge's own record made at ADD, else libcni's cache) is gone, and no veth on its bridge can
be its own. Any doubt keeps it: netns unknown or present, a veth on the bridge whose peer
cannot be read, a reservation younger than `min_age`, a call for the attachment in flight, an
unreachable runtime. A dead attachment is released only when it was already dead at an earlier
observation at least `confirm_after` seconds before, by the plugin's own DEL (veth, IPAM,
masquerade and source check rules, pybridge's netns record), after which its libcni cache entry is removed.

`decide` is the whole decision, pure; the I/O is `observe`, `runtime_reachable` and `Collector`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from cnikit import log, programs, skel

from .. import nsrecord
from . import networks

DEFAULT_INTERVAL = 60.0
DEFAULT_MIN_AGE = 60.0
DEFAULT_RUNTIME_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_CNI_PATH = "/opt/cni/bin"
RUNTIME_TIMEOUT = 1.0
OFF = "off"
MIN_AGE_ENV = "PYBRIDGE_GC_MIN_AGE"
RUNTIME_SOCKET_ENV = "PYBRIDGE_GC_RUNTIME_SOCKET"
CACHE_DIR_ENV = "PYBRIDGE_CNI_CACHE_DIR"

# Why an attachment is kept; RELEASE when it is not.
IN_FLIGHT = "call in flight"
NETNS_UNKNOWN = "netns unknown"
NETNS_EXISTS = "netns exists"
VETH_PRESENT = "veth present"
VETH_UNKNOWN = "a veth on the bridge cannot be told apart"
TOO_YOUNG = "reservation too young"
FIRST_SIGHTING = "dead once, awaiting a second observation"
RELEASE = "release"
RELEASED = "released"

Key = tuple[str, str]  # (container id, ifname): what a call's lock and in-flight set name


@dataclass(frozen=True)
class Candidate:
    """One reservation as seen at one observation."""

    network: str
    container_id: str
    ifname: str
    addresses: tuple[str, ...]
    netns: str  # the recorded netns path (pybridge's, else libcni's); "" when none is
    netns_exists: bool
    veth: bool | None  # a veth on the bridge carries its addresses; None: cannot tell
    age: float | None  # seconds since the reservation was written; None: unknown

    @property
    def key(self) -> Key:
        return self.container_id, self.ifname

    @property
    def identity(self) -> tuple[str, str, str, tuple[str, ...]]:
        """What must be unchanged between the two observations."""
        return self.network, self.container_id, self.ifname, self.addresses


@dataclass(frozen=True)
class Policy:
    min_age: float = DEFAULT_MIN_AGE
    confirm_after: float = DEFAULT_INTERVAL


@dataclass
class Decision:
    verdicts: list[tuple[Candidate, str]] = field(default_factory=list)
    suspects: dict[tuple[str, str, str, tuple[str, ...]], float] = field(default_factory=dict)

    @property
    def releases(self) -> list[Candidate]:
        return [c for c, verdict in self.verdicts if verdict == RELEASE]


def why_alive(c: Candidate, busy: AbstractSet[Key], min_age: float) -> str | None:
    """The first reason to keep `c`, or None if this observation finds it dead."""
    if c.key in busy:
        return IN_FLIGHT
    if not c.netns:
        return NETNS_UNKNOWN
    if c.netns_exists:
        return NETNS_EXISTS
    if c.veth is None:
        return VETH_UNKNOWN
    if c.veth:
        return VETH_PRESENT
    if c.age is None or c.age < min_age:
        return TOO_YOUNG
    return None


def decide(candidates: Iterable[Candidate], suspects: Mapping[tuple[str, str, str, tuple[str, ...]], float],
           now: float, busy: Iterable[Key], policy: Policy) -> Decision:
    """Verdicts of one observation. `suspects` (identity -> when first seen dead, monotonic) is
    the previous observation's; the returned one holds only what is dead now, so one sighting
    alive starts the count again."""
    in_flight = set(busy)
    decision = Decision()
    for c in candidates:
        reason = why_alive(c, in_flight, policy.min_age)
        if reason is None:
            first = suspects.get(c.identity, now)
            decision.suspects[c.identity] = first
            reason = RELEASE if first < now and now - first >= policy.confirm_after else FIRST_SIGHTING
        decision.verdicts.append((c, reason))
    return decision


def seconds(flag: str, given: str | None, env_var: str, default: float) -> float:
    """A number of seconds, 0 or more, from the flag, else the environment, else `default`.
    ValueError names the flag or variable."""
    raw, name = (given, flag) if given is not None else (os.environ.get(env_var), env_var)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise ValueError(f"{name}: {raw!r} is not a number of seconds, 0 or more")
    return value


def runtime_reachable(path: str) -> str | None:
    """None if the runtime's socket takes a connection, else why not; OFF skips the check."""
    if path == OFF:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(RUNTIME_TIMEOUT)
        sock.connect(path)
    except OSError as exc:
        return f"runtime socket {path}: {exc.strerror or exc}"
    finally:
        sock.close()
    return None


@dataclass(frozen=True)
class Network:
    """A network whose attachments the collector may release: its bridge plugin is pybridge."""

    name: str
    cni_version: str
    plugin: Mapping[str, object]

    def del_stdin(self) -> bytes:
        """The plugin's netconf as libcni hands it over: the plugin's block with the list's name
        and cniVersion."""
        return json.dumps({**self.plugin, "name": self.name, "cniVersion": self.cni_version}).encode()


def collectable(confs: Iterable[networks.Conf]) -> dict[str, Network]:
    """Network name -> the pybridge plugin of the first conf naming it (libcni's choice)."""
    found: dict[str, Network] = {}
    for conf in confs:
        plugin = conf.bridge_plugin()
        if conf.error is None and plugin is not None and plugin.get("type") == programs.PYBRIDGE \
                and conf.name not in found:
            found[conf.name] = Network(conf.name, conf.cni_version, plugin)
    return found


def observe(confs: list[networks.Conf], cache_dir: str) -> list[Candidate]:
    """Every reservation of the conf dir's pybridge networks, with the kernel's facts."""
    from . import attachments  # loaded by the agent only once it collects

    rows = attachments.collect(confs, cache_dir)
    ours = collectable(confs)
    bridge_of = {conf.name: conf.bridge for conf in confs if conf.bridge}
    # A veth whose peer shows no address (unnamed netns, or not yet configured) may be any
    # reservation's on that bridge.
    unknown = {bridge_of.get(r.network) for r in rows
               if r.state == attachments.NO_RESERVATION and not r.addresses}
    found = []
    for r in rows:
        if r.network not in ours or not r.container_id:
            continue
        live = r.state == attachments.OK  # a veth on its bridge carries its addresses
        cached = r.netns if not live and r.netns.startswith("/") else ""
        veth: bool | None = True if live else (None if bridge_of.get(r.network) in unknown else False)
        exists = live or (bool(cached) and os.path.lexists(cached))
        found.append(Candidate(r.network, r.container_id, r.ifname, tuple(r.addresses),
                               r.netns if live else cached, exists, veth,
                               float(r.age_seconds) if r.age_seconds is not None else None))
    return found


class Events(Protocol):
    """Where the collector reports: the agent's metrics, or nothing (`pybridge gc`)."""

    def collected(self, network: str) -> None: ...
    def collection(self, outcome: str) -> None: ...


class NoEvents:
    def collected(self, network: str) -> None:
        pass

    def collection(self, outcome: str) -> None:
        pass


# Outcomes of one collection run (the label of pybridge_gc_runs_total).
DONE = "done"
RUNTIME_DOWN = "runtime_unreachable"
FAILED = "failed"

# Runs one verb for an attachment: (exit code, stdout), or None when a call for the attachment
# is in flight (the agent's lock is taken) and nothing ran.
Runner = Callable[[Key, Mapping[str, str], bytes], tuple[int, str] | None]


def in_process(key: Key, env: Mapping[str, str], stdin: bytes) -> tuple[int, str] | None:
    """The verb served in this process, as the exec'd plugin would (`pybridge gc`)."""
    from .. import verbs

    out = io.StringIO()
    code = skel.run(lambda: verbs.VERBS, env, io.BytesIO(stdin), out, program=programs.PYBRIDGE,
                    stderr=io.StringIO())
    return code, out.getvalue()


@dataclass
class Settings:
    conf_dir: str
    cache_dir: str
    runtime_socket: str = DEFAULT_RUNTIME_SOCKET
    policy: Policy = field(default_factory=Policy)
    cni_path: str = DEFAULT_CNI_PATH


def settings(conf_dir: str, cache_dir: str, runtime_socket: str | None, policy: Policy) -> Settings:
    """The runtime socket: given, else the environment, else containerd's; CNI_PATH (where DEL
    finds an exec'd IPAM plugin) as the process has it, else the usual bin dir."""
    socket_path = runtime_socket or os.environ.get(RUNTIME_SOCKET_ENV) or DEFAULT_RUNTIME_SOCKET
    return Settings(conf_dir, cache_dir, socket_path, policy, os.environ.get("CNI_PATH") or DEFAULT_CNI_PATH)


class Collector:
    """One collection per `run_once`; keeps the suspects between runs."""

    def __init__(self, settings: Settings, runner: Runner, busy: Callable[[], set[Key]] = set,
                 events: Events | None = None, clock: Callable[[], float] = time.monotonic,
                 logger: log.Logger | None = None) -> None:
        self.settings = settings
        self._runner = runner
        self._busy = busy
        self._events: Events = events or NoEvents()
        self._clock = clock
        self._suspects: dict[tuple[str, str, str, tuple[str, ...]], float] = {}
        self._runtime_problem: str | None = None
        self._log = logger or log.process()

    def run_once(self, dry_run: bool = False) -> Decision | None:
        """Observe, decide and (unless `dry_run`) release; None when the runtime is unreachable
        or the observation failed: nothing is released then, and both observations start over."""
        logger = self._log
        problem = runtime_reachable(self.settings.runtime_socket)
        if problem is not None:
            if problem != self._runtime_problem:  # once per outage, not once per run
                logger.warning("gc_skipped", reason=problem)
            self._runtime_problem = problem
            self._suspects.clear()
            self._events.collection(RUNTIME_DOWN)
            return None
        if self._runtime_problem is not None:
            logger.event("gc_resumed", reason="runtime socket reachable again")
            self._runtime_problem = None
        confs = networks.load_all(self.settings.conf_dir)
        try:
            candidates = observe(confs, self.settings.cache_dir)
        except Exception as exc:  # a failed look at the node proves nothing dead
            logger.warning("gc_observation_failed", error=str(exc))
            self._suspects.clear()
            self._events.collection(FAILED)
            return None
        busy = self._busy()
        decision = decide(candidates, self._suspects, self._clock(), busy, self.settings.policy)
        self._suspects = decision.suspects
        if dry_run:
            self._events.collection(DONE)
            return decision
        failed = False
        found = collectable(confs)
        for i, (candidate, verdict) in enumerate(decision.verdicts):
            if verdict != RELEASE:
                continue
            outcome = self._release(found[candidate.network], candidate)
            decision.verdicts[i] = (candidate, outcome)
            failed |= outcome not in (RELEASED, IN_FLIGHT)
        self._drop_orphan_records(found, candidates, busy)
        self._events.collection(FAILED if failed else DONE)
        return decision

    def _drop_orphan_records(self, found: Mapping[str, Network], candidates: list[Candidate],
                             busy: AbstractSet[Key]) -> None:
        """pybridge's netns records that no reservation has (`nsrecord.orphans`): no DEL would
        ever come for them."""
        for network in found.values():
            ipam = network.plugin.get("ipam")
            store = nsrecord.data_dir(ipam) if isinstance(ipam, dict) else None
            if store is None:
                continue
            held = {c.key for c in candidates if c.network == network.name} | busy
            for name in nsrecord.orphans(store, network.name, held, self.settings.policy.min_age):
                container_id, _, ifname = name.partition(":")
                nsrecord.remove(store, network.name, container_id, ifname)
                self._log.event("gc_record_removed", network=network.name, container_id=container_id,
                                ifname=ifname)

    def _release(self, network: Network, c: Candidate) -> str:
        """The plugin's own DEL for the attachment, then its cache entry; the verdict to show."""
        env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": c.container_id, "CNI_IFNAME": c.ifname,
               "CNI_NETNS": "", "CNI_PATH": self.settings.cni_path}
        ran = self._runner(c.key, env, network.del_stdin())
        if ran is None:
            return IN_FLIGHT
        self._suspects.pop(c.identity, None)
        code, out = ran
        fields = {"network": c.network, "container_id": c.container_id, "ifname": c.ifname,
                  "addresses": list(c.addresses), "netns": c.netns}
        if code != 0:
            self._log.warning("gc_release_failed", **fields, error=out[:500])
            return f"release failed: {out[:200]}"
        try:
            os.unlink(os.path.join(self.settings.cache_dir, f"{c.network}-{c.container_id}-{c.ifname}"))
        except FileNotFoundError:
            pass
        except OSError as exc:  # a read-only cache (the DaemonSet mounts it so): the release stands
            self._log.warning("gc_cache_entry_kept", **fields, error=str(exc))
        self._log.event("gc_released", **fields, age_seconds=c.age)
        self._events.collected(c.network)
        return RELEASED


def start(collector: Collector, interval: float) -> threading.Thread:
    """Collect every `interval` seconds in a daemon thread; a run that fails is logged and the
    next one runs as usual."""

    def loop() -> None:
        while True:
            time.sleep(interval)
            try:
                collector.run_once()
            except Exception as exc:  # a bug must not end collection for the agent's lifetime
                log.process().exception("gc_internal_error", error=str(exc))

    thread = threading.Thread(target=loop, name="gc", daemon=True)
    thread.start()
    return thread
