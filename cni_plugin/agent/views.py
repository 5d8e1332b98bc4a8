"""Does the caller see the same files as the agent at the paths a call will use?

The agent opens `dataDir`, `logFile`, `resolvConf` and the IPAM plugin in CNI_PATH by path, in
its own mount namespace; an agent in a container where those paths are mounted differently
would allocate from another store than the in-process fallback (two pods, one IP). So the
client sends its root directory (an O_PATH fd, in its own mount namespace) and the agent serves
a call only if, for every such path, the deepest part that exists is the same file in both
views, and where the call writes (`dataDir`, the log file) that part is not on a read-only
mount for the agent (the DaemonSet mounts /var/lib/cni read-only); otherwise it declines and the
caller serves the call itself. This judges by the files,
not by namespace identity: `ip netns exec` gives each caller a mount namespace of its own that
shows the host's files, and those calls are served.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

DEFAULT_DATA_DIR = "/var/lib/cni/networks"  # ipam.config's default, without importing pydantic here


def call_paths(config: Mapping[str, Any] | None, env: Mapping[str, str]) -> Iterator[tuple[str, bool]]:
    """(absolute path, whether the call writes there) for each path a call may open or exec
    from; junk (`config` None: stdin was no JSON object) is left to the call to refuse."""
    if config is None:
        return
    ipam: dict[str, Any] = config["ipam"] if isinstance(config.get("ipam"), dict) else {}
    candidates = [(config.get("logFile"), True), (env.get("PYBRIDGE_LOG_FILE"), True),
                  (ipam.get("resolvConf"), False),
                  (ipam.get("dataDir", DEFAULT_DATA_DIR) if ipam.get("type") else None, True),
                  *((path, False) for path in env.get("CNI_PATH", "").split(":"))]
    for path, written in candidates:
        if isinstance(path, str) and path.startswith("/") and "\0" not in path:
            yield path, written


def _identity(path: str, dir_fd: int | None = None) -> tuple[int, int] | None:
    try:
        st = os.stat(path, dir_fd=dir_fd)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_file(root_fd: int, path: str, written: bool = False) -> bool:
    """Is the deepest existing part of `path` the same file for the agent and for the caller
    whose root directory is `root_fd` (a walk from that fd crosses the caller's mounts), and,
    if `written`, not on a read-only mount for the agent?"""
    probe = os.path.normpath(path)
    while True:
        mine = _identity(probe)
        theirs = _identity(probe.lstrip("/") or ".", root_fd)
        if mine is not None or theirs is not None or probe == "/":
            return mine == theirs and not (written and _read_only(probe))
        probe = os.path.dirname(probe)


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return True


def caller_sees_the_same(root_fd: int, config: Mapping[str, Any] | None, env: Mapping[str, str]) -> bool:
    return all(same_file(root_fd, path, written) for path, written in call_paths(config, env))
