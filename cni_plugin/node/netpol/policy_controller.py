"""The node controller's NetworkPolicy loop: a cache of the watched objects, re-applied on change.

Four list+watch streams (NetworkPolicy, Pod, Namespace, ClusterNetworkPolicy; kube.list_watch:
resourceVersion, relist on 410 Gone, a relist every `resync` seconds) feed one queue; one thread
takes an event, also takes every event already queued behind it, and only then compiles and
applies, so a burst of events costs one nft transaction. What the last ruleset compiled and
rendered is kept for the next (compile.Memo, nft.Chains): a policy is compiled and rendered again
only when it or the pods it reads changed. Applied is the change from the ruleset in force
(delta.py: elements added and deleted, the chains of what changed rewritten), or the whole
ruleset at the first apply, after a relist, and when the change failed. Nothing is applied
before all four kinds were listed once (a policy without its pods would cut them off). A lost
watch is a relist whose SYNC replaces that kind's cache whole: until it comes the rules in force
stay, so a resync opens no window. A ruleset nft refused or did not take in time is applied
again after an exponential backoff, events or not; no error ends a thread.
"""

from __future__ import annotations

import dataclasses
import gc
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ... import placement
from ...netlink import NetlinkError
from ..loop import Event, Log, Stream, drive, pump
from . import apply, bridgeports, claims, cluster, compile, conntrack, delta, nfnl, nft, objects, tiers
from .objects import KINDS, Address, Cause, Model, Refusal

Ports = Callable[[], Mapping[Address, Collection[str]]]
Forget = Callable[[Collection[Address]], int]
# Applies an element-only change to the tables of the model in force, True if it did (nfnl.apply)
ApplyElements = Callable[[str, delta.Model], bool]
OnBridge = Callable[[str], Collection[Address]]  # the addresses on the pod side of a bridge's ports
Key = tuple[str, str]
Owner = tuple[str, str, str]  # a pod's namespace, name and uid
WATCHED = (*KINDS, cluster.KIND)
APPLIER = "netpol"  # the thread that compiles and applies
PENDING_LIMIT = 10_000  # arrival times kept of the events not yet in force


def _key(obj: Any) -> Key:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


class Observer(Protocol):
    """Told what was refused and what was applied (ops/node_metrics.py)."""

    def field_refused(self, refusal: Refusal) -> None: ...
    def policies_refused(self, reasons: Mapping[str, int]) -> None: ...
    def applied(self, delays: Sequence[float], rules: int, elements: int) -> None: ...
    def apply_failed(self) -> None: ...


class Arrivals(queue.Queue[Event]):
    """The events' queue, which also keeps when each event came: the implementation delay counts
    from there, also while an event waits behind an apply still running."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.times: deque[float] = deque()
        self.gone: list[float] = []  # the arrival times of the events got since taken()

    def _put(self, item: Event) -> None:  # under the queue's mutex, as _get
        super()._put(item)
        self.times.append(self.clock())

    def _get(self) -> Event:
        self.gone.append(self.times.popleft())
        return super()._get()

    def taken(self) -> list[float]:
        with self.mutex:
            gone, self.gone = self.gone, []
        return gone


class PolicyController:
    """Feed it (kind, event, object) with handle(); reconcile() applies when something changed."""

    def __init__(self, node_name: str, apply_script: Callable[[str], None], log: Log,
                 observer: Observer | None = None, ports: Ports | None = None,
                 fence: nft.Fence | None = None, forget: Forget | None = None,
                 on_bridge: OnBridge | None = None, apply_elements: ApplyElements | None = None) -> None:
        self.node_name = node_name
        self.apply_script = apply_script
        self.apply_elements = apply_elements  # None: every change goes to apply_script
        self.log = log
        self.observer = observer
        self.ports = ports  # the bridge ports of pod addresses (bridgeports.py); None: not keyed by port
        self.port_map: Mapping[Address, Collection[str]] = {}
        self.fence = fence  # pods not placed yet are isolated (nft.Fence); None: open until placed
        self.forget = forget  # deletes the conntrack entries of addresses (conntrack.forget)
        self.on_bridge = on_bridge  # where a claimed address must be (bridgeports.py); None: unchecked
        self.owners: dict[Address, Owner] | None = None  # the fence in force: who is placed where
        self.placing: dict[Address, Owner] | None = None  # the same, of the ruleset being applied
        self.owned: tuple[object, object, dict[Address, Owner]] | None = None  # _place's, and from what
        self.claims = claims.Claims()
        self.objects: dict[str, dict[Key, Any]] = {kind: {} for kind in WATCHED}
        self.listed: set[str] = set()
        self.in_force: delta.Model | None = None  # the tables last applied (None after a relist)
        self.model: delta.Model | None = None  # the same, when the kernel holds it: changes apply to it
        self.text: tuple[delta.Model, str] | None = None  # the script of a model, rendered once
        # what the last ruleset compiled and rendered, for the next: an event recomputes what it touches
        self.memo = compile.Memo()
        self.chains = nft.Chains()
        self.closed: set[Refusal] = set()
        self.failed = False  # the last reconcile could not apply its ruleset
        self.pending: list[float] = []  # when the events not yet in force came (time.monotonic)
        self.settle: Callable[[], None] = lambda: None  # after a relist's rules are in force (settle_heap)

    def _parse(self, kind: str, obj: Any) -> Model | cluster.ClusterNetworkPolicy | None:
        """The object, or None; each refused field logged and counted (policies refused in part
        are kept, in their closed form: objects.read, cluster.read)."""
        model, refused = cluster.read(obj) if kind == cluster.KIND else objects.read(kind, obj)
        for refusal in refused:
            self.log("netpol-refused", kind=kind, object=refusal.name[:300], field=refusal.field[:300],
                     error=refusal.reason[:300], kept=model is not None)
            if self.observer:
                self.observer.field_refused(refusal)
        return model

    def handle(self, kind: str, event: str, payload: Any) -> None:
        if kind == "Claim":  # an ADD's addresses (claims.py), already read
            self.claims.add(payload)
            return
        if kind == "Pod" and event == "DELETED":
            self.claims.forget(_key(payload))
        store = self.objects[kind]
        if event == "SYNC":
            self.listed.add(kind)
            self.in_force = None  # after a full list, replace the tables even if unchanged (resync)
            self.model = None
            parsed = ((_key(o), self._parse(kind, o)) for o in payload)
            self.objects[kind] = {k: m for k, m in parsed if m is not None}
            return
        store.pop(_key(payload), None)
        if event != "DELETED":
            model = self._parse(kind, payload)
            if model is not None:
                store[_key(payload)] = model

    def _claimable(self) -> Collection[Address] | None:
        """The addresses a claim may place a pod at: those on the pod side of a port of the fence's
        bridge (a claim's word alone places nothing); none when they cannot be read."""
        if self.on_bridge is None or self.fence is None or not self.claims.by_pod:
            return None
        try:
            return self.on_bridge(self.fence.bridge)
        except (NetlinkError, OSError) as exc:
            self.log("netpol-warning", error=f"bridge ports not read, claims not used: {exc}"[:300])
            return ()

    @property
    def applied(self) -> str | None:
        """The script of the tables last applied."""
        return None if self.in_force is None else self.script(self.in_force)

    def script(self, tables: delta.Model) -> str:
        text = self.text  # once: `applied` is read from other threads too
        if text is None or text[0] is not tables:
            text = self.text = (tables, nft.script(tables))
        return text[1]

    def tables(self) -> delta.Model:
        pods = list(self.claims.pods(self.objects["Pod"], self.node_name, self._claimable()))  # both tiers
        decision = compile.decide(self.objects["NetworkPolicy"].values(), pods,
                                  self.objects["Namespace"].values(), self.node_name, self.memo)
        layers = tiers.decide(self.objects[cluster.KIND].values(), pods,
                              self.objects["Namespace"].values(), self.node_name)
        enforced: list[compile.PolicyRules | tiers.ClusterRules] = [*decision.policies, *layers.policies]
        closed = {r for p in enforced for r in p.refused}
        for refusal in closed - self.closed:  # once, from when it is enforced closed on this node
            self.log("netpol-closed", kind=refusal.kind, policy=refusal.name[:300], field=refusal.field[:300],
                     error=refusal.reason[:300])
        self.closed = closed
        if self.observer:
            causes = Counter(c for p in enforced for c in {f.cause for f in p.refused})
            self.observer.policies_refused({c.value: causes[c] for c in Cause})
        if self.ports is not None:
            try:
                self.port_map = self.ports()
            except (NetlinkError, OSError) as exc:  # the last ports read stay in force
                self.log("netpol-warning", error=f"bridge ports not read: {exc}"[:300])
        # No policy anywhere: nothing a new pod must be kept from, so pod starts are not held up
        # where NetworkPolicy is unused. The first policy brings the fence with it.
        fence = self.fence if self.objects["NetworkPolicy"] or self.objects[cluster.KIND] else None
        if fence is not None:
            decision = self._place(decision)
        else:
            self.placing = None
        return nft.model(decision, self.port_map, layers, fence, self.chains)

    def _place(self, decision: compile.Decision) -> compile.Decision:
        """Before a pod is placed at an address that no pod held in the fence in force, the
        address's conntrack entries go (conntrack.py); the fence drops its traffic until then, so
        none can form in between. An address another pod held there is first unplaced by this
        transaction (its pod's rules could let new entries form meanwhile), and its entries go
        at the next try; so is one whose entries could not be deleted. When the fence comes up,
        the pods already there keep theirs: they were open until then."""
        owned = self.owned  # kept while the local pods and the placed addresses are the same objects
        if owned is not None and owned[0] is decision.local and owned[1] is decision.placed:
            owners = owned[2]
        else:
            owners = {a: (p.metadata.namespace, p.metadata.name, p.metadata.uid)
                      for p, addresses, _hosts in decision.local.values()
                      for a in addresses if a in decision.placed}
            self.owned = (decision.local, decision.placed, owners)
        if self.owners is None or self.forget is None:
            self.placing = owners
            return decision
        held = self.owners
        new = [] if owners is held else sorted((a for a, o in owners.items() if held.get(a) != o),
                                               key=lambda a: (a.version, a))
        later = {a for a in new if a in held}
        try:
            if now := [a for a in new if a not in later]:
                self.forget(now)
        except (NetlinkError, OSError) as exc:
            self.log("netpol-warning", error=f"conntrack of {len(new)} new pod addresses not deleted, "
                     f"left unplaced: {exc}"[:300])
            later = set(new)
        if later:
            self.failed = True  # tried again after a backoff, or with the next events
            decision = dataclasses.replace(decision, placed=decision.placed - later)
        self.placing = {a: o for a, o in owners.items() if a not in later} if later else owners
        return decision

    def reconcile(self) -> bool:
        """True when a new ruleset was applied."""
        self.failed = False
        if self.listed != set(WATCHED):
            return False
        model = self.tables()
        if model == self.in_force:
            self.owners = self.placing
            self.pending = []  # what they changed is in force already
            return False
        relisted = self.in_force is None  # the first ruleset, or the first after a relist
        try:
            self._apply(model)
        except apply.NftError as exc:
            self.failed = True
            self.model = None  # the tables are replaced whole at the next try
            self.log("netpol-error", error=str(exc))
            if self.observer:
                self.observer.apply_failed()
            return False
        self.in_force = self.model = model
        self.owners = self.placing
        if self.observer:
            done = time.monotonic()
            self.observer.applied([done - t for t in self.pending], *nft.census(model))
        self.pending = []
        self.log("netpol-applied", policies=len(self.objects["NetworkPolicy"]), pods=len(self.objects["Pod"]))
        if relisted:
            self.settle()
        return True

    def _apply(self, model: delta.Model) -> None:
        """The change to `model`'s tables in one transaction, else the whole of them. A change nft
        refused left the old rules (one transaction): the whole ruleset replaces them at once."""
        change = None if self.model is None else delta.diff(self.model, model)
        if change is not None:
            try:
                if change and not self._batched(change):  # "": the same tables, written otherwise
                    self.apply_script(change)
                return
            except apply.NftError as exc:
                self.log("netpol-warning", error=f"update refused, replacing the tables: {exc}"[:300])
        self.apply_script(self.script(model))

    def _batched(self, change: str) -> bool:
        """Whether `change`, only elements, went in as one netlink batch (nfnl.py). A batch the
        kernel refused changed nothing (a batch is one transaction): nft applies the change then."""
        if self.apply_elements is None or self.model is None:
            return False
        try:
            return self.apply_elements(change, self.model)
        except OSError as exc:  # NetlinkError, TimeoutError
            self.log("netpol-warning", error=f"element batch refused, applying it with nft: {exc}"[:300])
        except Exception as exc:  # a bug of the encoder must not hold every later change up
            self.log("netpol-error", error=f"element batch failed, applying it with nft: {exc!r}"[:300])
        return False


def settle_heap() -> None:
    """Move what is alive now (the cluster's objects and what the ruleset kept of them) out of the
    garbage collector's way: a full collection walks every tracked object (~240,000 with 500 pods
    and 5,000 in the API view: ~150 ms, which an event would otherwise wait for now and then).
    Done once per relist, after the rules are in force: what was frozen before is collected then
    (a cycle among frozen objects is never collected otherwise)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def serve(agent: PolicyController, events: queue.Queue[Event], stop: threading.Event,
          on_applied: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
    """Handle events until `stop`; a burst already queued is applied once. A ruleset that could
    not be applied (nft failed or hung, or a bug) is tried again after a backoff."""

    def step(batch: list[Event]) -> bool:
        agent.pending += events.taken() if isinstance(events, Arrivals) else [clock()] * len(batch)
        # While nft keeps failing, the oldest arrivals are the ones that matter (the delay's tail)
        del agent.pending[PENDING_LIMIT:]
        for kind, event, payload in batch:
            agent.handle(kind, event, payload)
        if agent.reconcile():
            on_applied()
        return agent.failed

    drive(step, events, stop, lambda event, **fields: agent.log(f"netpol-{event}", **fields), clock)


def start(agent: PolicyController, stream: Stream, log: Log, errors: tuple[type[BaseException], ...],
          stop: threading.Event, on_applied: Callable[[], None] = lambda: None,
          claim_socket: socket.socket | None = None) -> list[threading.Thread]:
    events = Arrivals()
    threads = [threading.Thread(target=pump, args=(kind, stream, events, log, stop, errors),
                                name=f"netpol-{kind}", daemon=True) for kind in WATCHED]
    if claim_socket is not None:
        threads.append(threading.Thread(target=claims.receive, args=(claim_socket, events, stop, log),
                                        name="netpol-claims", daemon=True))
    threads.append(threading.Thread(target=serve, args=(agent, events, stop, on_applied), name=APPLIER,
                                    daemon=True))
    for thread in threads:
        thread.start()
    return threads


def listers(api: Any, stop: threading.Event | None = None) -> dict[str, Callable[..., Any]]:
    from .. import kube

    group, version, plural = cluster.RESOURCE
    return {"NetworkPolicy": kube.lister(api, "/apis/networking.k8s.io/v1/networkpolicies"),
            "Pod": kube.lister(api, "/api/v1/pods"), "Namespace": kube.lister(api, "/api/v1/namespaces"),
            # not served (no CRD): none exist, an empty list (kube.optional)
            cluster.KIND: kube.optional(kube.lister(api, f"/apis/{group}/{version}/{plural}"),
                                        (stop or threading.Event()).wait)}


def kube_stream(api: Any, resync: int, stop: threading.Event, log: Log) -> Stream:
    from .. import kube

    calls = listers(api, stop)

    def report(kind: str) -> Callable[[Exception], None]:  # 401, 403 (RBAC), TLS...: before each retry
        def say(exc: Exception) -> None:
            event, fields = kube.complaint(exc)
            log(event, kind=kind, **fields)
        return say

    return lambda kind: kube.list_watch(api, calls[kind], timeout_seconds=resync, stop=stop.is_set,
                                        report=report(kind))


@dataclass
class Enforcement:
    """The running enforcement: `stop` ends it; readiness() says why it cannot hold, or None."""

    stop: threading.Event
    bridge_errors: list[str]
    threads: list[threading.Thread] = field(default_factory=list)
    ports: bridgeports.Watch | None = None  # the applier's, closed when it is done

    def wait(self, timeout: float) -> None:
        """After `stop`: wait up to `timeout` s for the ruleset being applied, if any (the rules
        in force stay; the streams are left to end with the process)."""
        for thread in self.threads:
            if thread.name == APPLIER:
                thread.join(timeout)
                if not thread.is_alive() and self.ports is not None:
                    self.ports.close()
                    self.ports = None

    def readiness(self) -> str | None:
        if self.bridge_errors:
            return "NetworkPolicy cannot see bridged pod-to-pod traffic: " + "; ".join(self.bridge_errors)
        return None

    def check_bridge(self, log: Log, enable: Callable[[], list[str]] = apply.enable_bridge_netfilter) -> None:
        """Turn bridge-nf-call on if off (again: br_netfilter may have been loaded since)."""
        errors = enable()
        for error in sorted(set(errors) - set(self.bridge_errors)):
            log("netpol-warning", error=f"pod-to-pod traffic on the bridge escapes policy: {error}")
        self.bridge_errors = errors


def _claim_socket(path: str, log: Log) -> socket.socket | None:
    try:
        return claims.bind(path)
    except OSError as exc:  # new pods then stay isolated until the API shows their addresses
        log("netpol-warning", error=f"claim socket {path} not bound: {exc}"[:300])
        return None


def _bridge_ports(enforcement: Enforcement, log: Log) -> tuple[Ports, OnBridge]:
    """The bridge ports kept from notifications (bridgeports.Watch); read whole at each
    reconcile where notifications cannot be had."""
    try:
        enforcement.ports = watch = bridgeports.Watch()
    except OSError as exc:
        log("netpol-warning", error=f"bridge ports read whole at each event, not followed: {exc}"[:300])
        return bridgeports.pod_ports, lambda bridge: bridgeports.pod_ports(bridge=bridge)
    return watch.pods, watch.on_bridge


def launch(node_name: str, api: Any, resync: int, log: Log,
           enable: Callable[[], list[str]] = apply.enable_bridge_netfilter,
           observer: Observer | None = None, stop: threading.Event | None = None,
           fence: nft.Fence | None = None, claim_path: str = placement.SOCKET) -> Enforcement:
    """Enforcement in background threads of the node controller until `stop`. Not ready while bridged
    traffic escapes the rules (bridge-nf-call off and not settable); checked again after each
    apply. The tables of an earlier run stay in force until the first ruleset replaces them.
    With a valid `fence`, pods not placed yet are isolated; ADDs announce theirs on `claim_path`."""
    enforcement = Enforcement(stop or threading.Event(), [])
    enforcement.check_bridge(log, enable)
    if fence is None or not fence.valid():
        log("netpol-warning", error="no cluster CIDR or bridge: a new pod is open until the API shows its IP")
        fence = None
    ports, on_bridge = _bridge_ports(enforcement, log)
    agent = PolicyController(node_name, apply.replace, log, observer, ports, fence, conntrack.forget,
                             on_bridge, nfnl.apply)
    agent.settle = settle_heap
    # Any error of a stream (transport, or an answer the client cannot read) is logged and the
    # stream starts over with a fresh list after a backoff.
    enforcement.threads = start(agent, kube_stream(api, resync, enforcement.stop, log), log, (Exception,),
                                enforcement.stop, on_applied=lambda: enforcement.check_bridge(log, enable),
                                claim_socket=_claim_socket(claim_path, log) if fence else None)
    log("netpol-started", node=node_name)
    return enforcement
