"""What the plugins of a chain speak: each plugin's answer to VERSION, asked with a bounded wait,
and the newest cniVersion all of them take.

libcni runs a conflist's plugins in order and stops at the first error, DEL included. So one
plugin that rejects the conflist's cniVersion fails every ADD, and the cleanup DEL fails at it
before the plugins ahead of it see the DEL: their reservations and rules leak, one per attempt
(Debian 12's portmap 1.1.1 speaks up to 1.0.0, under a 1.1.0 conflist).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cnikit.spec.version import SUPPORTED

VERSION_TIMEOUT = 5.0  # a Go plugin answers VERSION in a few ms; one that hangs is not waited on
MAX_VERSIONS = 32
_ENV_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# This program's own plugins: the node controller knows what they speak (its bin dir's links point
# at host paths it may not see).
OWN_TYPES = frozenset(("pybridge", "pyipam"))


@dataclass(frozen=True)
class Probe:
    """One plugin's answer: the versions it supports, or why they are unknown."""

    type: str
    path: str = ""
    versions: tuple[str, ...] | None = None
    problem: str = ""

    def takes(self, version: str) -> bool | None:
        """Whether it accepts `version`; None when unknown."""
        return None if self.versions is None else version in self.versions

    def describe(self) -> str:
        where = f"{self.type} ({self.path})" if self.path else self.type
        if self.versions is None:
            return f"{where}: {self.problem}"
        return f"{where} supports {', '.join(self.versions)}"


def key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def find(bin_dirs: Sequence[str], plugin_type: str) -> str | None:
    """The plugin's executable as libcni finds it: the first bin dir holding it."""
    if not plugin_type or "/" in plugin_type or plugin_type in (".", ".."):
        return None
    for directory in bin_dirs:
        path = os.path.join(directory, plugin_type)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _versions(reply: bytes) -> tuple[str, ...] | None:
    try:
        data = json.loads(reply)
    except ValueError:
        return None
    versions = data.get("supportedVersions") if isinstance(data, dict) else None
    if not isinstance(versions, list) or not 0 < len(versions) <= MAX_VERSIONS \
            or not all(isinstance(v, str) and 0 < len(v) <= 16 for v in versions):
        return None
    return tuple(versions)


def _exec_version(path: str, bin_dirs: Sequence[str], ask: str, timeout: float) -> bytes:
    """The plugin's stdout for VERSION; its whole process group is killed at the timeout."""
    env = {"CNI_COMMAND": "VERSION", "CNI_PATH": os.pathsep.join(bin_dirs), "PATH": _ENV_PATH}
    request = json.dumps({"cniVersion": ask}).encode()
    with subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, env=env, start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(request, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started
            raise
    return out


def probe(plugin_type: str, bin_dirs: Sequence[str], ask: str = SUPPORTED[-1],
          timeout: float = VERSION_TIMEOUT) -> Probe:
    """Ask the plugin `plugin_type` of `bin_dirs` which versions it supports (CNI_COMMAND=VERSION)."""
    path = find(bin_dirs, plugin_type)
    if path is None:
        return Probe(plugin_type, problem=f"not found in {', '.join(bin_dirs)}")
    try:
        reply = _exec_version(path, bin_dirs, ask, timeout)
    except subprocess.TimeoutExpired:
        return Probe(plugin_type, path, problem=f"no answer to VERSION within {timeout:g} s")
    except OSError as exc:
        return Probe(plugin_type, path, problem=f"cannot run it: {exc.strerror or exc}")
    versions = _versions(reply)
    if versions is None:
        return Probe(plugin_type, path, problem=f"VERSION answered no supportedVersions: {reply[:100]!r}")
    return Probe(plugin_type, path, versions)


def newest_common(ceiling: str, probes: Iterable[Probe], candidates: Sequence[str] = SUPPORTED) -> str | None:
    """The newest of `candidates` up to `ceiling` that every probe with known versions takes."""
    known = [p.versions for p in probes if p.versions is not None]
    fitting = [v for v in candidates if key(v) <= key(ceiling) and all(v in k for k in known)]
    return max(fitting, key=key, default=None)


class Cache:
    """Probes per plugin file, asked again only when the file changes (an upgrade), so a node
    agent that reconciles on every Node event does not exec the chain each time."""

    def __init__(self, bin_dirs: Sequence[str], timeout: float = VERSION_TIMEOUT) -> None:
        self.bin_dirs = tuple(bin_dirs)
        self.timeout = timeout
        self._seen: dict[str, tuple[tuple[int, ...], Probe]] = {}

    def probe(self, plugin_type: str) -> Probe:
        if plugin_type in OWN_TYPES:
            return Probe(plugin_type, versions=SUPPORTED)
        path = find(self.bin_dirs, plugin_type)
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns) if st else ()
        cached = self._seen.get(plugin_type)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        found = probe(plugin_type, self.bin_dirs, timeout=self.timeout)
        self._seen[plugin_type] = (stamp, found)
        return found
