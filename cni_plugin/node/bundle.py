"""Install a frozen bundle on a node: versioned copy, then atomic symlink switch.

<store>/<digest>/ holds one complete bundle (copied under a temp name, then renamed) and
<store>/current points at it. <bin>/pybridge and <bin>/pyipam become symlinks to the bundle's
compiled client (`cni-client`, agent/client.c: ~1 ms to start, forwards to the agent the
DaemonSet runs, and execs <store>/current/<program> when no agent accepts) or, in a bundle
without it, to the bundle's own executable. Each link is swapped in with a rename: a runtime
exec'ing the plugin meanwhile gets the old or the new bundle, never a half-copied one. The
previous bundle is kept (an exec may have resolved the old link just now); older ones go.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys

from cnikit.programs import PROGRAMS, PYBRIDGE

from .. import files

EXECUTABLE = PYBRIDGE
CLIENT = "cni-client"
CURRENT = "current"
_DIGEST = re.compile(r"^[0-9a-f]{16}$")


def running_bundle_dir() -> str | None:
    if getattr(sys, "frozen", False):
        return os.path.dirname(os.path.realpath(sys.executable))
    return None


def bundle_digest(source: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(source):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, source).encode() + b"\0")
            if os.path.islink(path):
                digest.update(b"L" + os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest()[:16]


def _swap_symlink(target: str, link: str) -> None:
    files.replace(link, lambda tmp: os.symlink(target, tmp))


def install_bundle(source: str, bin_dir: str, store_dir: str, host_store_dir: str | None = None) -> str:
    """Returns the installed bundle directory (as this process sees it)."""
    if not os.access(os.path.join(source, EXECUTABLE), os.X_OK):
        raise FileNotFoundError(f"no bundle executable in {source}")
    host_store_dir = host_store_dir or store_dir
    digest = bundle_digest(source)
    final = os.path.join(store_dir, digest)
    os.makedirs(store_dir, exist_ok=True)
    os.makedirs(bin_dir, exist_ok=True)
    if not os.path.isdir(final):
        tmp = os.path.join(store_dir, f".{digest}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, symlinks=True)
        os.replace(tmp, final)
    _swap_symlink(digest, os.path.join(store_dir, CURRENT))  # the client's fallback dir
    entry = CLIENT if os.access(os.path.join(final, CLIENT), os.X_OK) else EXECUTABLE
    previous = set()
    for program in PROGRAMS:
        link = os.path.join(bin_dir, program)
        with contextlib.suppress(OSError):
            previous.add(os.path.basename(os.path.dirname(os.readlink(link))))
        _swap_symlink(os.path.join(host_store_dir, digest, entry), link)
    for name in os.listdir(store_dir):
        if _DIGEST.match(name) and name != digest and name not in previous:
            shutil.rmtree(os.path.join(store_dir, name), ignore_errors=True)
    return final
