"""`pybridge node run|install`: the node agent and the DaemonSet's install step.

run:     watch Node objects, keep this node's conflist, routes to the other nodes' podCIDRs and
         the pod masquerade in line with them (model.plan), in the netns it runs in (hostNetwork).
         `--nodes-file` reconciles once from a recorded NodeList instead of the API server.
install: copy the frozen bundle this process runs from into the host, switch
         /opt/cni/bin/pybridge and pyipam to it atomically (install.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import time
from collections.abc import Iterable
from typing import Any, Protocol

from cnikit import log

from .. import chain
from . import model

# JSON lines on stderr (`kubectl logs`), as every pybridge log. The Node, NetworkPolicy and
# metrics threads log at once: structlog writes each line whole under a lock of its stream.
_logger = log.to_stderr()
_log = _logger.event


class Effects(Protocol):
    def routes(self) -> set[model.Route]: ...
    def mtu(self, node: model.Node | None) -> int | None: ...
    def apply(self, plan: model.Plan) -> list[str]: ...
    def resync(self) -> None: ...


class Observer(Protocol):
    """Told the outcome of each reconcile (ops/node_metrics.py)."""

    def waiting(self, reason: str) -> None: ...
    def reconciled(self, nodes: int, routes: int, errors: int, full_sync: bool) -> None: ...


class NodeAgent:
    """Keeps the node cache from events and reconciles after each one."""

    def __init__(self, settings: model.Settings, effects: Effects, observer: Observer | None = None,
                 plugins: chain.Cache | None = None) -> None:
        self.settings = settings
        self.effects = effects
        self.observer = observer
        self.plugins = plugins  # asks the chained plugins' VERSION; None: not asked
        self.nodes: dict[str, model.Node] = {}
        self._waiting: str | None = None
        self._notes: list[str] = []

    def handle(self, kind: str, payload: Any) -> model.Plan:
        if kind == "SYNC":
            self.effects.resync()  # after a full list, re-apply everything even if unchanged
            self.nodes = {n.name: n for n in (model.node_from_object(o) for o in payload)}
        else:
            node = model.node_from_object(payload)
            if kind == "DELETED":
                self.nodes.pop(node.name, None)
            else:
                self.nodes[node.name] = node
        return self.reconcile(full_sync=kind == "SYNC")

    def reconcile(self, full_sync: bool = False) -> model.Plan:
        nodes = list(self.nodes.values())
        own = self.nodes.get(self.settings.node_name)
        if own is None or not own.pod_cidrs:  # wait before touching anything, even to read
            result = model.plan(self.settings, nodes, (), None)
        else:
            chained = [self.plugins.probe(t) for t in model.CHAINED] if self.plugins else []
            result = model.plan(self.settings, nodes, self.effects.routes(), self.effects.mtu(own), chained)
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
            return result
        self._waiting = None
        errors = self.effects.apply(result)
        if self.observer:
            self.observer.reconciled(len(self.nodes), len(result.routes), len(errors), full_sync)
        if result.route_sets or result.route_deletes or errors:
            _log("reconciled", set=[f"{r.dst} via {r.gateway}" for r in sorted(result.route_sets)],
                 deleted=[f"{r.dst} via {r.gateway}" for r in sorted(result.route_deletes)], errors=errors)
        return result


def _networks(values: Iterable[str]) -> tuple[model.Network, ...]:
    return tuple(ipaddress.ip_network(v.strip()) for value in values for v in value.split(",") if v.strip())


def load_nodes_file(path: str) -> list[Any]:
    with open(path) as f:
        data = json.load(f)
    items = data.get("items", [data]) if isinstance(data, dict) else data
    return list(items)


def _run(args: argparse.Namespace) -> int:
    from .effects import Host

    if not args.node_name:
        _log("error", error="--node-name (or NODE_NAME) is required")
        return 2
    settings = model.Settings(
        node_name=args.node_name, cluster_cidrs=_networks(args.cluster_cidr or []), bridge=args.bridge,
        ipam_data_dir=args.ipam_data_dir, network=args.network, log_file=args.plugin_log_file,
        cni_version=args.cni_version)
    agent = NodeAgent(settings, Host(args.cni_conf_dir), plugins=chain.Cache(args.cni_bin_dir.split(":")))
    if args.nodes_file:
        result = agent.handle("SYNC", load_nodes_file(args.nodes_file))
        return 3 if result.waiting else 0

    import urllib3

    from ..ops import node_metrics
    from . import kube

    agent.observer, _endpoint = node_metrics.start(args.metrics_address,
                                                   os.path.join(args.cni_conf_dir, model.CONFLIST_NAME))

    api = kube.api_client(args.kubeconfig)
    _log("started", node=settings.node_name, cluster_cidrs=[str(c) for c in settings.cluster_cidrs])
    _network_policy(args, api)
    while True:
        try:
            for kind, payload in kube.node_events(api, timeout_seconds=args.resync, report=_api_error):
                agent.handle(kind, payload)
        # ValueError: an object the client's models refuse; a retry, not a crash loop
        except (urllib3.exceptions.HTTPError, OSError, RuntimeError, ValueError) as exc:
            _log("retry", error=str(exc)[:300])
            time.sleep(2.0)


def _network_policy(args: argparse.Namespace, api: Any) -> None:
    """Enforce NetworkPolicy in background threads (netpol/), or remove the rules of an earlier run."""
    from .netpol import agent, apply

    if args.network_policy == "on":
        agent.launch(args.node_name, api, args.resync, _log)
        return
    try:
        apply.remove()
        _log("netpol-off")
    except apply.NftError as exc:
        _log("netpol-error", error=str(exc))


def _api_error(exc: Exception) -> None:
    """A refused list or watch (401 for a bad token, 403 without RBAC...), before the retry."""
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    _log("api_error", status=status, reason=str(reason)[:100], error=str(exc)[:300])


def _install(args: argparse.Namespace) -> int:
    from . import install

    source = args.bundle_dir or install.running_bundle_dir()
    if source is None:
        _log("error", error="not running from a frozen bundle: give --bundle-dir")
        return 2
    target = install.install_bundle(source, bin_dir=args.bin_dir, store_dir=args.store_dir,
                                    host_store_dir=args.host_store_dir)
    _log("installed", bundle=target, bin_dir=args.bin_dir)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pybridge node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the node agent")
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
    run.add_argument("--kubeconfig", default=None)
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
