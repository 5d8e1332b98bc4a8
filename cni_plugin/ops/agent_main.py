"""`pybridge agent`: the resident agent with its metrics endpoint and collector, wired here so
the agent's serving code (agent/) never imports the metrics, and `pybridge agent` never loads
`doctor`, nor `ls` until its collector first runs."""

from __future__ import annotations

import argparse
import os

from ..agent import server, wire
from . import agent_metrics, collector, networks


def main(argv: list[str]) -> int:
    """`pybridge agent`: the resident agent with its metrics endpoint."""
    parser = argparse.ArgumentParser(prog="pybridge agent", description="The resident agent.")
    parser.add_argument("socket", nargs="?", help=f"default: ${wire.SOCKET_ENV} or {wire.DEFAULT_SOCKET}")
    parser.add_argument("--metrics-address", help="HOST:PORT of /metrics, /healthz, /readyz, or 'off' "
                        "(env PYBRIDGE_METRICS_ADDRESS; default 127.0.0.1:9430)")
    parser.add_argument("--health-address", help="HOST:PORT of /healthz and /readyz alone, for the kubelet's "
                        "probes, or 'off' (env PYBRIDGE_HEALTH_ADDRESS; default 127.0.0.1:9432)")
    parser.add_argument("--conf-dir", help="CNI conf dir whose networks' pools are measured "
                        "(env PYBRIDGE_CONF_DIR; default /etc/cni/net.d)")
    parser.add_argument("--gc-interval", help="seconds between two runs of the collector of attachments "
                        "the runtime forgot, 0: none (env PYBRIDGE_GC_INTERVAL; default "
                        f"{collector.DEFAULT_INTERVAL:g})")
    parser.add_argument("--gc-min-age", help="the collector keeps reservations younger than this, in seconds "
                        f"(env PYBRIDGE_GC_MIN_AGE; default {collector.DEFAULT_MIN_AGE:g})")
    parser.add_argument("--gc-runtime-socket", help="the collector does nothing while this socket "
                        "refuses, or 'off' (env PYBRIDGE_GC_RUNTIME_SOCKET; default "
                        f"{collector.DEFAULT_RUNTIME_SOCKET})")
    parser.add_argument("--cache-dir", help="libcni's result cache, where the collector reads each netns "
                        f"path (env {collector.CACHE_DIR_ENV}; default {networks.DEFAULT_CACHE_DIR})")
    args = parser.parse_args(argv)
    try:
        interval = collector.seconds("--gc-interval", args.gc_interval, "PYBRIDGE_GC_INTERVAL",
                                     collector.DEFAULT_INTERVAL)
        min_age = collector.seconds("--gc-min-age", args.gc_min_age, collector.MIN_AGE_ENV,
                                    collector.DEFAULT_MIN_AGE)
        observer, endpoint = agent_metrics.start(args.metrics_address, args.conf_dir, args.health_address)
    except ValueError as exc:  # a bad metrics or health address, a bad number of seconds
        parser.error(str(exc))
    cache_dir = args.cache_dir or os.environ.get(collector.CACHE_DIR_ENV) or networks.DEFAULT_CACHE_DIR
    settings = collector.settings(networks.conf_dir(args.conf_dir), cache_dir, args.gc_runtime_socket,
                                  collector.Policy(min_age, interval))

    def collect(agent: server.Agent) -> None:
        if interval > 0:
            running = collector.Collector(settings, agent.run_alone, agent.attachments_in_flight, observer)
            collector.start(running, interval)

    return server.run(args.socket, observer, endpoint, collect)
