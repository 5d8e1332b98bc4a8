"""`pybridge ls` and `pybridge doctor`: argument parsing and output."""

from __future__ import annotations

import argparse
import json
import os

from ..agent import wire
from . import attachments, doctor, networks


def _common(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    parser.add_argument("--conf-dir", help=f"CNI conf dir (env {networks.CONF_DIR_ENV}; default "
                        f"{networks.DEFAULT_CONF_DIR})")
    parser.add_argument("--cache-dir", default=attachments.DEFAULT_CACHE_DIR,
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


def main(command: str, argv: list[str]) -> int:
    return ls(argv) if command == "ls" else run_doctor(argv)
