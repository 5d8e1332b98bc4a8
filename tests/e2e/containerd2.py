"""containerd 2.x for the containerd tier, from Debian's own archive (unstable), beside Debian 12's 1.6.

Debian 12 ships containerd 1.6; kind's node images ship 2.x. Debian's unstable suite carries 2.x
built against nothing newer than Debian 12's libc, so its `containerd`, `containerd-shim-runc-v2`
and `ctr` run here with Debian 12's runc. `obtain()` fetches the newest .deb the archive has with a
private apt setup (its own sources list, state and cache dirs: the machine's apt sources are not
used and its state is never written), unpacks it with `dpkg-deb -x` into a cache outside the repo,
and returns the unpacked `usr/bin`. Nothing is installed. `unpacked(PLUGINS)` does the same for
today's reference plugins (kind's nodes carry those, not Debian 12's 1.1.1).

The cache (`$PYBRIDGE_TEST_CACHE/sid/<package>`, by default under /var/cache/pybridge-tests) is
reused while younger than REFRESH_AFTER; an older one is refreshed, and kept when the archive cannot
be reached. No version is pinned: sid moves, and whatever it has is what the tiers run.

By hand: `python -m tests.e2e.containerd2` prints the directory holding the binaries.
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

PACKAGE = "containerd"
PLUGINS = "containernetworking-plugins"  # the reference plugins, in usr/lib/cni
SUITE = "sid"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REFRESH_AFTER = 7 * 24 * 3600  # seconds: sid's version moves, a week-old cache is looked at again
BINARIES = ("containerd", "containerd-shim-runc-v2", "ctr")
APT_TIMEOUT = 300  # seconds for the whole update or download


class Unavailable(Exception):
    """containerd 2.x could not be obtained; the message says why."""


def cache_root() -> Path:
    base = os.environ.get("PYBRIDGE_TEST_CACHE", "/var/cache/pybridge-tests")
    return Path(base) / "sid"


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
    _apt(apt_dir, "update")
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


def obtain(sid: Path | None = None) -> Path:
    """The usr/bin of an unpacked containerd 2.x."""
    return _check(unpacked(PACKAGE, sid) / "usr" / "bin")


def reference_plugins(sid: Path | None = None) -> Path:
    """The directory of sid's reference CNI plugins (bridge, host-local, loopback, portmap...)."""
    plugins = unpacked(PLUGINS, sid) / "usr" / "lib" / "cni"
    if not os.access(plugins / "portmap", os.X_OK):
        raise Unavailable(f"{plugins} has no portmap")
    return plugins


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
