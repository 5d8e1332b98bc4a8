"""`pybridge ls`, `pybridge doctor` and `pybridge gc`: argument parsing and output."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from cnikit import log

from ..agent import wire
from . import attachments, collector, doctor, networks


def _common(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    parser.add_argument("--conf-dir", help=f"CNI conf dir (env {networks.CONF_DIR_ENV}; default "
                        f"{networks.DEFAULT_CONF_DIR})")
    parser.add_argument("--cache-dir", default=networks.DEFAULT_CACHE_DIR,
                        help="libcni's result cache, to tell a gone netns (default: %(default)s)")
    return parser


def ls(argv: list[str]) -> int:
    args = _common("pybridge ls", "Every attachment on the node: IPAM stores joined with the kernel.") \
        .parse_args(argv)
    rows = attachments.collect(networks.load_all(networks.conf_dir(args.conf_dir)), args.cache_dir)
    print(json.dumps([r.as_json() for r in rows], indent=2) if args.json else attachments.table(rows))
    return 0


def run_doctor(argv: list[str]) -> int:
    parser = _common("pybridge doctor", "Check the node; exit 1 when a check fails.")
    parser.add_argument("--bin-dir", default="/opt/cni/bin", help="CNI bin dir (default: %(default)s)")
    args = parser.parse_args(argv)
    node = doctor.Node(networks.conf_dir(args.conf_dir), args.bin_dir, args.cache_dir,
                       os.environ.get(wire.SOCKET_ENV) or wire.DEFAULT_SOCKET)
    results = doctor.run(node)
    print(doctor.as_json(results) if args.json else doctor.text(results))
    return 1 if any(c.status == doctor.FAIL for c in results) else 0


def _verdicts(decision: collector.Decision, dry_run: bool) -> list[dict[str, Any]]:
    return [{"network": c.network, "container_id": c.container_id, "ifname": c.ifname,
             "addresses": list(c.addresses), "netns": c.netns,
             "verdict": "would release" if dry_run and verdict == collector.RELEASE else verdict}
            for c, verdict in decision.verdicts]


def _verdict_table(rows: list[dict[str, Any]]) -> str:
    lines = [("NETWORK", "CONTAINER", "IFNAME", "ADDRESSES", "NETNS", "VERDICT")]
    lines += [(r["network"], r["container_id"][:12], r["ifname"], ",".join(r["addresses"]) or "-",
               r["netns"] or "-", r["verdict"]) for r in rows]
    widths = [max(len(line[col]) for line in lines) for col in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def gc(argv: list[str]) -> int:
    """The agent's collector, run once by hand: two observations `--confirm-after` apart."""
    parser = _common("pybridge gc", "Release the attachments whose sandbox is gone (netns and veth), "
                     "as the agent's collector does: docs/operations.md.")
    parser.add_argument("--dry-run", action="store_true", help="show what would be released, release nothing")
    parser.add_argument("--confirm-after", help="seconds between the two observations (default 10)")
    parser.add_argument("--min-age", help="keep reservations younger than this, in seconds "
                        f"(env PYBRIDGE_GC_MIN_AGE; default {collector.DEFAULT_MIN_AGE:g})")
    parser.add_argument("--runtime-socket", help="do nothing while this socket refuses, or 'off' "
                        f"(env PYBRIDGE_GC_RUNTIME_SOCKET; default {collector.DEFAULT_RUNTIME_SOCKET})")
    args = parser.parse_args(argv)
    try:
        confirm = collector.seconds("--confirm-after", args.confirm_after, "", 10.0)
        min_age = collector.seconds("--min-age", args.min_age, collector.MIN_AGE_ENV,
                                    collector.DEFAULT_MIN_AGE)
    except ValueError as exc:
        parser.error(str(exc))
    settings = collector.settings(networks.conf_dir(args.conf_dir), args.cache_dir, args.runtime_socket,
                                  collector.Policy(min_age, confirm))
    run = collector.Collector(settings, collector.in_process, logger=log.to_stderr())
    first = run.run_once(dry_run=True)  # the first observation never releases
    if first is not None and first.suspects:
        time.sleep(confirm)
    decision = run.run_once(dry_run=args.dry_run) if first is not None else None
    if decision is None:
        print("pybridge gc: nothing collected: the runtime is unreachable or the node could not be read "
              "(see the log)", file=sys.stderr)
        return 1
    rows = _verdicts(decision, args.dry_run)
    print(json.dumps(rows, indent=2) if args.json else _verdict_table(rows))
    return 1 if any(str(r["verdict"]).startswith("release failed") for r in rows) else 0


def main(command: str, argv: list[str]) -> int:
    return {"ls": ls, "doctor": run_doctor, "gc": gc}[command](argv)
