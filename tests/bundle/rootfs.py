"""A minimal Debian bookworm root without Python (debootstrap --variant=minbase), cached per machine.

The mirror comes from this machine's apt configuration (deb822 .sources or one-line .list), so
nothing here names a host. The root is built once under CACHE_DIR (a flock serialises
concurrent test runs; the build goes to a temp dir renamed into place) and copied per test with
hard links, which is instant; tests only add files to their copy, never change one in place.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
from pathlib import Path

CACHE_DIR = Path(os.environ.get("PYBRIDGE_TEST_CACHE", "/var/cache/pybridge-test"))
SUITE = "bookworm"


def apt_sources(root: str = "/etc/apt") -> list[tuple[str, list[str]]]:
    """(URI, suites) of every `deb` entry apt is configured with."""
    entries: list[tuple[str, list[str]]] = []
    for path in sorted(glob.glob(f"{root}/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    for path in [f"{root}/sources.list", *sorted(glob.glob(f"{root}/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                if words[1].startswith("["):  # options: [arch=amd64 signed-by=...]
                    while words and not words[0].endswith("]"):
                        words.pop(0)
                    words = ["deb", *words[1:]]
                entries.append((words[1], words[2:3]))
    return entries


def debian_mirror(suite: str = SUITE, root: str = "/etc/apt") -> str:
    entries = apt_sources(root)
    for uri, suites in entries:
        if suite in suites:
            return uri
    for uri, _ in entries:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    raise LookupError(f"no Debian mirror for {suite} in {root}/sources.list*")


def has_python(root: Path) -> list[str]:
    found = []
    for pattern in (
        "usr/bin/python*",
        "usr/local/bin/python*",
        "bin/python*",
        "usr/lib/python3*",
        "usr/lib/x86_64-linux-gnu/libpython*",
        "usr/lib/*/libpython*",
    ):
        found += glob.glob(str(root / pattern))
    return found


def minbase_root() -> Path:
    """The cached root, built on first use (about 35-90 s, needs the mirror)."""
    target = CACHE_DIR / f"{SUITE}-minbase"
    if (target / "etc" / "debian_version").exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "etc" / "debian_version").exists():
            return target
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not os.path.exists(debootstrap):
            raise FileNotFoundError("debootstrap is not installed (.ci/run installs it)")
        tmp = CACHE_DIR / f".{SUITE}-minbase.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run(
            [debootstrap, "--variant=minbase", SUITE, str(tmp), debian_mirror()],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"debootstrap failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    return target


def copy_root(source: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-al", str(source), str(dest)], check=True)
    return dest
