"""Packages from Debian's own archive (unstable), unpacked beside Debian 12's, never installed.

Debian 12 ships containerd 1.6, libcni 1.1.2 and the reference plugins 1.1.1; kind's node images
and today's runtimes use newer ones, which Debian's unstable suite carries. `unpacked(package)`
fetches the newest .deb the archive has with a private apt setup (its own sources list, state and
cache dirs: the machine's apt sources are not used and its state is never written), unpacks it
with `dpkg-deb -x` into a cache outside the repo and returns the unpacked tree. The containerd
tier (testbed/containerd2.py), the interop tier (libcni, the reference plugins) and `make bench`
(the reference plugins) share it.

The cache (`$PYBRIDGE_TEST_CACHE/sid/<package>`, by default under /var/cache/pybridge-tests) is
reused while younger than REFRESH_AFTER; an older one is refreshed, and kept when the archive cannot
be reached. No version is pinned: sid moves, and whatever it has is what the tiers run.

By hand: `python scripts/sid.py PACKAGE...` prints each unpacked tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "sid"
PLUGINS = "containernetworking-plugins"  # the reference plugins, in usr/lib/cni
LIBCNI = "golang-github-appc-cni-dev"  # libcni's Go sources, in usr/share/gocode
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REFRESH_AFTER = 7 * 24 * 3600  # seconds: sid's version moves, a week-old cache is looked at again
APT_TIMEOUT = 300  # seconds for the whole update or download


class Unavailable(Exception):
    """A package could not be obtained from the archive; the message says why."""


def cache_base() -> Path:
    """Where the tiers cache what they fetch or build ($PYBRIDGE_TEST_CACHE)."""
    return Path(os.environ.get("PYBRIDGE_TEST_CACHE", "/var/cache/pybridge-tests"))


def cache_root() -> Path:
    return cache_base() / SUITE


def machine_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the machine's own sources name (one-line or deb822), else deb.debian.org."""
    candidates = [sources / "sources.list", *sorted(sources.glob("sources.list.d/*.list")),
                  *sorted(sources.glob("sources.list.d/*.sources"))]
    for path in candidates:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                match = re.match(r"\s*(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", line)
                if match and match.group(1).rstrip("/").endswith("/debian"):
                    return match.group(1).rstrip("/")
    return DEFAULT_MIRROR


def _apt(apt_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """apt-get with every source, state and cache path inside `apt_dir`."""
    options = {
        "Dir::Etc::sourcelist": apt_dir / "sources.list",
        "Dir::Etc::sourceparts": "-",
        "Dir::Etc::preferences": "/dev/null",
        "Dir::Etc::preferencesparts": "-",
        "Dir::State": apt_dir / "state",
        "Dir::State::status": "/var/lib/dpkg/status",  # read only: what is installed here
        "Dir::Cache": apt_dir / "cache",
        "Acquire::Languages": "none",
        "APT::Sandbox::User": "root",  # the private dirs are root's; no _apt privilege drop
    }
    argv = ["apt-get", "-q", *(f"-o{key}={value}" for key, value in options.items()), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=APT_TIMEOUT, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"apt-get {args[0]} timed out after {APT_TIMEOUT}s") from exc
    if proc.returncode != 0:
        raise Unavailable(f"apt-get {' '.join(args)} -> rc {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return proc


def _download(sid: Path, package: str) -> Path:
    """The newest .deb of `package` in sid, into sid/<package>/debs; returns its path."""
    apt_dir = sid / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(f"deb [signed-by={KEYRING}] {machine_mirror()} {SUITE} main\n")
    _apt(apt_dir, "update", "--error-on=any")  # an unreachable archive is the reason, not a later "no source"
    debs = sid / package / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for old in debs.glob("*.deb"):
        old.unlink()
    _apt(apt_dir, "download", package, cwd=debs)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if len(found) != 1:
        raise Unavailable(f"apt-get download {package} left {[p.name for p in found]} in {debs}")
    return found[0]


def _unpack(root: Path, deb: Path) -> Path:
    """dpkg-deb -x into root/<version>, made whole before it is renamed into place and named
    `current`; the .deb goes (the unpacked tree is the cache)."""
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    target = root / version.replace(":", "_")
    if not target.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
        subprocess.run(["dpkg-deb", "-x", deb, staging], capture_output=True, check=True)
        staging.rename(target)
    current = root / ".current.tmp"
    current.unlink(missing_ok=True)
    current.symlink_to(target.name)
    current.rename(root / "current")
    deb.unlink()
    return target


def unpacked(package: str, sid: Path | None = None) -> Path:
    """The unpacked tree of sid's `package`: the cached one while fresh, else the newest."""
    sid = sid or cache_root()
    try:
        sid.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create the cache {sid}: {exc}") from exc
    with (sid / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs share one download
        current = sid / package / "current"
        if current.exists() and time.time() - current.lstat().st_mtime < REFRESH_AFTER:
            return current.resolve()
        try:
            return _unpack(sid / package, _download(sid, package))
        except (Unavailable, subprocess.CalledProcessError, OSError) as exc:
            if current.exists():  # the archive is unreachable: the stale cache still serves
                print(f"sid: refreshing {package} failed, using the cached {current.resolve()}: {exc}",
                      file=sys.stderr)
                return current.resolve()
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable(f"unpacking {package} from {SUITE} failed: {exc}") from exc


def upstream_version(tree: Path) -> str:
    """`1.9.1` of an unpacked tree named `1.9.1+ds1-1` (Debian's epoch, suffix and revision off)."""
    match = re.match(r"(?:\d+_)?(\d+(?:\.\d+)+)", tree.name)
    if not match:
        raise Unavailable(f"no upstream version in {tree.name!r}")
    return match.group(1)


def reference_plugins(sid: Path | None = None) -> Path:
    """The directory of sid's reference CNI plugins (bridge, host-local, loopback, portmap...)."""
    plugins = unpacked(PLUGINS, sid) / "usr" / "lib" / "cni"
    missing = [name for name in ("bridge", "host-local", "portmap") if not os.access(plugins / name, os.X_OK)]
    if missing:
        raise Unavailable(f"{plugins} lacks {', '.join(missing)}")
    return plugins


def plugins_version(plugins: Path) -> str:
    """The upstream version of the reference plugins in `plugins` (sid's tree or Debian 12's
    /usr/lib/cni, whose version dpkg knows)."""
    tree = plugins.parents[2]
    if tree.parent.name == PLUGINS:
        return upstream_version(tree)
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", PLUGINS], capture_output=True, text=True,
                          check=False)
    return upstream_version(Path(proc.stdout.strip() or "unknown"))


if __name__ == "__main__":
    started = time.monotonic()
    try:
        trees = [unpacked(package) for package in sys.argv[1:] or [PLUGINS, LIBCNI]]
    except Unavailable as exc:
        sys.exit(f"unavailable: {exc}")
    print("\n".join(map(str, trees)))
    print(f"ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
