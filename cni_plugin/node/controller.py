"""`pybridge node run|install`: the node controller and the DaemonSet's install step.

run:     watch Node objects, keep this node's conflist, routes to the other nodes' podCIDRs and
         the pod masquerade in line with them (model.desired), in the netns it runs in (hostNetwork).
         `--nodes-file` reconciles once from a recorded NodeList instead of the API server.
install: copy the frozen bundle this process runs from into the host, switch
         /opt/cni/bin/pybridge and pyipam to it atomically (bundle.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from cnikit import log

from .. import chain
from . import loop, model

if TYPE_CHECKING:
    from .netpol import policy_controller

# JSON lines on stderr (`kubectl logs`), as every pybridge log. The Node, NetworkPolicy and
# metrics threads log at once: structlog writes each line whole under a lock of its stream.
_logger = log.to_stderr()
_log = _logger.event
# After SIGTERM: how long a ruleset being applied may take to finish (the kubelet's grace is 30 s;
# the agent exits within 5 s). A half-written `nft -f` script must never be what nft reads.
STOP_GRACE = 4.0


class Effects(Protocol):
    def routes(self) -> set[model.Route]: ...
    def foreign_routes(self) -> set[str]: ...
    def mtu(self, node: model.Node | None) -> int | None: ...
    def apply(self, desired: model.Desired) -> list[str]: ...
    def resync(self) -> None: ...


class Observer(Protocol):
    """Told the outcome of each reconcile (ops/node_metrics.py)."""

    def waiting(self, reason: str) -> None: ...
    def reconciled(self, nodes: int, routes: int, errors: int, full_sync: bool) -> None: ...
    def refused(self, kind: str, reason: str) -> None: ...


class NodeController:
    """Keeps the node cache from events and reconciles after each one; `failed` says the last
    reconcile left something undone (the caller retries it after a backoff)."""

    def __init__(self, settings: model.Settings, effects: Effects, observer: Observer | None = None,
                 plugins: chain.Cache | None = None) -> None:
        self.settings = settings
        self.effects = effects
        self.observer = observer
        self.plugins = plugins  # asks the chained plugins' VERSION; None: not asked
        self.nodes: dict[str, model.Node] = {}
        self.failed = False
        self._waiting: str | None = None
        self._refused: set[model.Refusal] = set()
        self._notes: list[str] = []

    def _refuse(self, refusal: model.Refusal) -> None:
        _log("refused", reason=refusal.reason, subject=refusal.subject, detail=refusal.detail)
        if self.observer:
            self.observer.refused("Node", refusal.reason)

    def _parse(self, obj: Any) -> model.Node | None:
        """The Node, or None for one without a name; every entry skipped is logged and counted."""
        try:
            node = model.node_from_object(obj)
        except model.Malformed as exc:
            self._refuse(model.Refusal("malformed", "node " + repr(_name_of(obj)), str(exc)))
            return None
        for problem in node.problems:
            self._refuse(model.Refusal("malformed", f"node {node.name!r}", problem))
        return node

    def handle(self, kind: str, payload: Any) -> model.Desired:
        if kind == "SYNC":
            self.effects.resync()  # after a full list, re-apply everything even if unchanged
            self.nodes = {n.name: n for n in (self._parse(o) for o in payload) if n is not None}
        else:
            node = self._parse(payload)
            if node is not None and kind == "DELETED":
                self.nodes.pop(node.name, None)
            elif node is not None:
                self.nodes[node.name] = node
        return self.reconcile(full_sync=kind == "SYNC")

    def reconcile(self, full_sync: bool = False) -> model.Desired:
        self.failed = True  # until this one has run to its end
        nodes = list(self.nodes.values())
        own = self.nodes.get(self.settings.node_name)
        if own is None or not own.pod_cidrs:  # wait before touching anything, even to read
            result = model.desired(self.settings, nodes, (), None)
        else:
            chained = [self.plugins.probe(t) for t in model.CHAINED] if self.plugins else []
            result = model.desired(self.settings, nodes, self.effects.routes(), self.effects.mtu(own),
                                self.effects.foreign_routes(), chained)
        refused = set(result.refused)
        for refusal in sorted(refused - self._refused):  # said once, until it changes
            self._refuse(refusal)
        self._refused = refused
        if result.notes != self._notes:  # each reconcile repeats them: log them when they change
            for note in result.notes:  # each a risk to the node's pods: a warning
                _logger.warning("note", note=note)
            self._notes = result.notes
        if result.waiting:
            if result.waiting != self._waiting:
                _log("waiting", reason=result.waiting)
            self._waiting = result.waiting
            if self.observer:
                self.observer.waiting(result.waiting)
            self.failed = False
            return result
        self._waiting = None
        errors = self.effects.apply(result)
        self.failed = bool(errors)
        if self.observer:
            self.observer.reconciled(len(self.nodes), len(result.routes), len(errors), full_sync)
        if result.route_sets or result.route_deletes or errors:
            _log("reconciled", set=[f"{r.dst} via {r.gateway}" for r in sorted(result.route_sets)],
                 deleted=[f"{r.dst} via {r.gateway}" for r in sorted(result.route_deletes)], errors=errors)
        return result


def _name_of(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return str(meta.get("name", ""))[:100] if isinstance(meta, dict) else ""


def _networks(values: Iterable[str]) -> tuple[model.Network, ...]:
    return tuple(ipaddress.ip_network(v.strip()) for value in values for v in value.split(",") if v.strip())


def load_nodes_file(path: str) -> list[Any]:
    with open(path) as f:
        data = json.load(f)
    items = data.get("items", [data]) if isinstance(data, dict) else data
    return list(items)


def _run(args: argparse.Namespace) -> int:
    from .effects import NodeEffects

    if not args.node_name:
        _log("error", error="--node-name (or NODE_NAME) is required")
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # a DaemonSet roll, or ^C: exit 0, rules kept
        signal.signal(signum, lambda _signum, _frame: stop.set())
    settings = model.Settings(
        node_name=args.node_name, cluster_cidrs=_networks(args.cluster_cidr or []), bridge=args.bridge,
        ipam_data_dir=args.ipam_data_dir, network=args.network, log_file=args.plugin_log_file,
        cni_version=args.cni_version)
    plugins = chain.Cache(args.cni_bin_dir.split(":"))
    agent = NodeController(settings, NodeEffects(args.cni_conf_dir), plugins=plugins)
    if args.nodes_file:
        result = agent.handle("SYNC", load_nodes_file(args.nodes_file))
        return 3 if result.waiting else 0

    from ..ops import node_metrics
    from . import kube

    try:
        api = kube.api_client(args.kubeconfig)
    except kube.ConfigError as exc:
        _log("error", error=str(exc))
        return 2
    metrics, _endpoints = node_metrics.start(args.metrics_address,
                                            os.path.join(args.cni_conf_dir, model.CONFLIST_NAME))
    agent.observer = metrics
    _log("started", node=settings.node_name, cluster_cidrs=[str(c) for c in settings.cluster_cidrs])
    if not settings.cluster_cidrs:
        _log("error", error="no --cluster-cidr (env POD_SUBNET): no podCIDR will be routed or used")
    enforcement = _network_policy(args, api, metrics, stop)
    if metrics is not None and metrics.checks is not None and enforcement is not None:
        metrics.checks.add("NetworkPolicy", enforcement.readiness)
    events: queue.Queue[loop.Event] = queue.Queue()
    threading.Thread(target=_pump, args=(api, args.resync, events, stop), name="nodes", daemon=True).start()
    serve(agent, events, stop)
    # Routes, masquerade and the policy rules stay in force: the pods keep their network and
    # their protection until the next agent takes the tables over (each in one transaction).
    if enforcement is not None:
        enforcement.wait(STOP_GRACE)
    _log("stopped", rules="left in force")  # the endpoints' sockets close with the process
    # What is left is the interpreter's teardown: ~2 s of CPU (the API client's modules and
    # pools), 5-7 s on a loaded node, past the 5 s a roll allows. Nothing of ours needs it: the
    # state is in the kernel and the log line above is written whole.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve(agent: NodeController, events: queue.Queue[loop.Event], stop: threading.Event) -> None:
    """Handle Node events until `stop`. A reconcile that failed (nft down or hung, a route
    refused, a bug) is retried after an exponential backoff, also when no event comes."""

    def step(batch: list[loop.Event]) -> bool:
        for _node, kind, payload in batch:
            agent.handle(kind, payload)
        if not batch:
            agent.reconcile()
        return agent.failed

    loop.drive(step, events, stop, _log)


def _pump(api: Any, resync: int, events: queue.Queue[loop.Event], stop: threading.Event) -> None:
    """Node events into the queue, as ("Node", event, payload), until `stop` (no error ends it)."""
    from . import kube

    loop.pump("Node", lambda _kind: kube.node_events(api, timeout_seconds=resync, stop=stop.is_set,
                                                     report=_api_error),
              events, _log, stop, (Exception,))


def _network_policy(args: argparse.Namespace, api: Any, observer: policy_controller.Observer | None = None,
                    stop: threading.Event | None = None) -> policy_controller.Enforcement | None:
    """Enforce NetworkPolicy in background threads (netpol/) until `stop`, or remove the rules
    of an earlier run. Returns the enforcement when it is on."""
    from .netpol import apply, nft, policy_controller

    if args.network_policy == "on":
        fence = nft.Fence(args.bridge, _networks(args.cluster_cidr or []))
        return policy_controller.launch(args.node_name, api, args.resync, _log, observer=observer, stop=stop,
                                        fence=fence)
    try:
        apply.remove()
        _log("netpol-off")
    except apply.NftError as exc:
        _log("netpol-error", error=str(exc))
    return None


def _api_error(exc: Exception) -> None:
    """A failed list or watch of Nodes, before the retry."""
    from .kube import complaint

    event, fields = complaint(exc)
    _log(event, kind="Node", **fields)


def _install(args: argparse.Namespace) -> int:
    from . import bundle

    source = args.bundle_dir or bundle.running_bundle_dir()
    if source is None:
        _log("error", error="not running from a frozen bundle: give --bundle-dir")
        return 2
    target = bundle.install_bundle(source, bin_dir=args.bin_dir, store_dir=args.store_dir,
                                    host_store_dir=args.host_store_dir)
    _log("installed", bundle=target, bin_dir=args.bin_dir)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pybridge node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the node controller")
    run.add_argument("--node-name", default=os.environ.get("NODE_NAME"))
    run.add_argument("--cluster-cidr", action="append",
                     default=[os.environ["POD_SUBNET"]] if os.environ.get("POD_SUBNET") else None,
                     help="never masquerade towards these (comma-separated or repeated; env POD_SUBNET)")
    run.add_argument("--cni-conf-dir", default="/etc/cni/net.d")
    run.add_argument("--cni-bin-dir", default=os.environ.get("CNI_BIN_DIR", "/opt/cni/bin"),
                     help="where the chained plugins (portmap) are as this process sees them, ':'-separated; "
                          "asked for their VERSION so the conflist's cniVersion is one they take "
                          "(env CNI_BIN_DIR)")
    run.add_argument("--ipam-data-dir", default="/run/cni-ipam-state")
    run.add_argument("--bridge", default="pyb0")
    run.add_argument("--network", default="pybridge")
    run.add_argument("--plugin-log-file", default=None)
    run.add_argument("--cni-version", default=os.environ.get("CNI_VERSION", model.AUTO),
                     choices=(model.AUTO, *model.CNI_VERSIONS),
                     help="the conflist's cniVersion; auto (default): from the node's container runtime "
                          "(containerd 2.x: 1.1.0, else 1.0.0); either is lowered to one every chained "
                          "plugin takes (env CNI_VERSION)")
    run.add_argument("--kubeconfig", default=None,
                     help="outside a cluster only (development): in a pod the service account is used, "
                          "never $KUBECONFIG or ~/.kube/config")
    run.add_argument("--resync", type=int, default=60, help="seconds between full lists")
    run.add_argument("--nodes-file", help="reconcile once from a recorded NodeList (JSON) instead")
    run.add_argument("--metrics-address", help="HOST:PORT of /metrics, /healthz, /readyz, or 'off' "
                     "(env PYBRIDGE_METRICS_ADDRESS; default 127.0.0.1:9431)")
    run.add_argument("--network-policy", choices=("on", "off"),
                     default=os.environ.get("NETWORK_POLICY", "on"),
                     help="enforce NetworkPolicy (env NETWORK_POLICY); off removes the rules")
    inst = sub.add_parser("install", help="install the running bundle as /opt/cni/bin/pybridge and pyipam")
    inst.add_argument("--bundle-dir", help="the bundle directory (default: the one this runs from)")
    inst.add_argument("--bin-dir", default="/host/opt/cni/bin")
    inst.add_argument("--store-dir", default="/host/opt/pybridge",
                      help="where versioned bundle copies go, as this process sees it")
    inst.add_argument("--host-store-dir", default="/opt/pybridge",
                      help="the same directory as the node sees it (symlink targets)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _install(args)
