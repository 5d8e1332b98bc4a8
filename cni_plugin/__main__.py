"""The `pybridge` executable: one CNI call per process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def main() -> None:
    from . import skel

    def verbs() -> Mapping[str, skel.Verb]:
        from .verbs import VERBS

        return VERBS

    sys.exit(skel.run(verbs, os.environ, sys.stdin.buffer, sys.stdout, program="pybridge"))


if __name__ == "__main__":
    main()
