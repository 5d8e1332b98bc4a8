"""containerd 2.x for the containerd tier, from Debian's own archive (unstable), beside Debian 12's 1.6.

Debian 12 ships containerd 1.6; kind's node images ship 2.x. Debian's unstable suite carries 2.x
built against nothing newer than Debian 12's libc, so its `containerd`, `containerd-shim-runc-v2`
and `ctr` run here with Debian 12's runc. `obtain()` unpacks the newest .deb the archive has
(scripts/sid.py: a private apt setup, a cache outside the repo, nothing installed) and returns
the unpacked `usr/bin`; `sid.reference_plugins()` does the same for today's reference plugins
(kind's nodes carry those, not Debian 12's 1.1.1).

By hand: `python -m testbed.containerd2` prints the directory holding the binaries.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from scripts.sid import SUITE, Unavailable, reference_plugins, unpacked

__all__ = ["SUITE", "Unavailable", "obtain", "version"]

PACKAGE = "containerd"
BINARIES = ("containerd", "containerd-shim-runc-v2", "ctr")


def _check(bin_dir: Path) -> Path:
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise Unavailable(f"{bin_dir} lacks {', '.join(missing)}")
    proc = subprocess.run([bin_dir / "containerd", "--version"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or version(bin_dir).split(".")[0] != "2":
        raise Unavailable(f"{bin_dir / 'containerd'} --version -> {proc.stdout.strip()}{proc.stderr.strip()}")
    return bin_dir


def version(bin_dir: Path | None = None) -> str:
    """The upstream version (`2.1.9`, `1.6.20`) of the containerd in bin_dir, or on PATH."""
    containerd = str(bin_dir / "containerd") if bin_dir else "containerd"
    out = subprocess.run([containerd, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"\s(\d+\.\d+\.\d+)", out)
    if not match:
        raise Unavailable(f"no version in `{containerd} --version`: {out.strip()!r}")
    return match.group(1)


def obtain(sid: Path | None = None) -> Path:
    """The usr/bin of an unpacked containerd 2.x."""
    return _check(unpacked(PACKAGE, sid) / "usr" / "bin")


if __name__ == "__main__":
    started = time.monotonic()
    try:
        bin_dir = obtain()
        plugins = reference_plugins()
    except Unavailable as exc:
        sys.exit(f"unavailable: {exc}")
    print(bin_dir)
    print(plugins)
    print(f"containerd {version(bin_dir)} and {plugins.parents[2].name} ready in "
          f"{time.monotonic() - started:.1f}s", file=sys.stderr)
