"""The `pybridge` executable: one CNI call per process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        from .agent import server

        sys.exit(server.run(sys.argv[2] if len(sys.argv) > 2 else None))
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
