"""`pybridge agent`: the resident agent with its metrics endpoint, wired here so the agent's
serving code (agent/) never imports the metrics, and `pybridge agent` never loads `ls` and
`doctor` (pyroute2's IPRoute: ~10 MiB of the agent's RSS)."""

from __future__ import annotations

import argparse

from ..agent import server, wire
from . import agent_metrics


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
    args = parser.parse_args(argv)
    try:
        observer, endpoint = agent_metrics.start(args.metrics_address, args.conf_dir, args.health_address)
    except ValueError as exc:  # a bad metrics or health address
        parser.error(str(exc))
    return server.run(args.socket, observer, endpoint)
