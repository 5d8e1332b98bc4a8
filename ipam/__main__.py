"""pyipam: the host-local compatible IPAM plugin executable, plus `pyipam ls` for humans.

GC takes the valid attachments from `cni.dev/valid-attachments` (spec HEAD) or else
`cni.dev/attachments` (the spec-v1.1.0 tag's name); libcni sends both. With neither key (or a
null one) nothing is valid and every reservation of the network is released: that is what
`cnitool gc` asks for, and the spec says an empty list is meaningful.

pydantic is imported only once a verb is served, so VERSION and argument errors stay cheap.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from cni_plugin import skel
from cni_plugin.spec.attachments import valid_attachments
from cni_plugin.spec.errors import CNIError


def verbs() -> dict[str, skel.Verb]:
    """The verb table; skel asks for it only when a verb is served."""
    from cni_plugin.spec.result import convert_result

    from . import plugin

    def add(req: skel.Request) -> dict[str, Any]:
        cmd = req.cmd
        result = plugin.ipam_add(req.config, cmd.container_id, cmd.ifname, cmd.cni_args)
        return convert_result(result, req.cni_version)

    def delete(req: skel.Request) -> None:
        plugin.ipam_del(req.config, req.cmd.container_id, req.cmd.ifname)

    def check(req: skel.Request) -> None:
        plugin.ipam_check(req.config, req.cmd.container_id, req.cmd.ifname)

    def status(req: skel.Request) -> None:
        plugin.ipam_status(req.config)

    def gc(req: skel.Request) -> None:
        plugin.ipam_gc(req.config, valid_attachments(req.config))

    return {"ADD": add, "DEL": delete, "CHECK": check, "STATUS": status, "GC": gc}


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
    sys.exit(skel.run(verbs, os.environ, sys.stdin.buffer, sys.stdout, program="pyipam"))


if __name__ == "__main__":
    main()
