"""pyipam: the host-local compatible IPAM plugin executable, plus `pyipam ls` for humans.

The verbs (verbs.py, pydantic) are imported only once one is served, so VERSION and argument
errors stay cheap.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from cnikit import programs, skel
from cnikit.spec.errors import CNIError


def verbs() -> Mapping[str, skel.Verb]:
    from .verbs import VERBS

    return VERBS


def _ls(argv: list[str]) -> int:
    import argparse

    from .config import DEFAULT_DATA_DIR
    from .plugin import list_reservations

    parser = argparse.ArgumentParser(prog="pyipam ls", description="List IP reservations.")
    parser.add_argument("--network", help="only this network")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        rows = list_reservations(args.data_dir, args.network)
    except CNIError as exc:
        print(f"pyipam ls: {exc}", file=sys.stderr)
        return 1
    table = [("NETWORK", "IP", "CONTAINER ID", "IFNAME"), *rows]
    widths = [max(len(row[col]) for row in table) for col in range(4)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["ls"]:
        sys.exit(_ls(argv[1:]))
    sys.exit(skel.run(verbs, os.environ, sys.stdin.buffer, sys.stdout, program=programs.PYIPAM))


if __name__ == "__main__":
    main()
