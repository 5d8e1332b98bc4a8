"""The `pybridge` executable: one CNI call per process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnikit import skel


def verbs() -> Mapping[str, skel.Verb]:
    """The verb table, imported only when a verb is served (VERSION stays cheap)."""
    from .verbs import VERBS

    return VERBS


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        from .ops import agent_main

        sys.exit(agent_main.main(sys.argv[2:]))
    if sys.argv[1:2] in (["ls"], ["doctor"], ["gc"]):
        from .ops.commands import main as ops_main

        sys.exit(ops_main(sys.argv[1], sys.argv[2:]))
    if sys.argv[1:2] == ["node"]:
        from .node import controller

        sys.exit(controller.main(sys.argv[2:]))
    from cnikit import programs, skel

    sys.exit(skel.run(verbs, os.environ, sys.stdin.buffer, sys.stdout, program=programs.PYBRIDGE))


if __name__ == "__main__":
    main()
