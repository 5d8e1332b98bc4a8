"""The `pybridge` executable: one CNI call per process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        from .agent import server

        sys.exit(server.main(sys.argv[2:]))
    if sys.argv[1:2] in (["ls"], ["doctor"]):
        from .ops.cli import main as ops_main

        sys.exit(ops_main(sys.argv[1], sys.argv[2:]))
    if sys.argv[1:2] == ["node"]:
        from .node import cli

        sys.exit(cli.main(sys.argv[2:]))
    from . import skel

    def verbs() -> Mapping[str, skel.Verb]:
        from .verbs import VERBS

        return VERBS

    sys.exit(skel.run(verbs, os.environ, sys.stdin.buffer, sys.stdout, program="pybridge"))


if __name__ == "__main__":
    main()
