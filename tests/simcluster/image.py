"""The pybridge image from deploy/Dockerfile, built daemonless with buildah, no registry.

Both FROM images are made here under the names the Dockerfile uses: tests/bundle's Debian
bookworm minbase root (debootstrap, cached per machine) as docker.io/library/debian:bookworm-slim,
and on it the python stand-in of base/python.Containerfile as
docker.io/library/python:3.11-slim-bookworm. The product image is then `buildah bud -f
deploy/Dockerfile` of the repository, unchanged, and an OCI archive of it is what each node's
containerd imports (as docker.io/library/pybridge:dev, the manifest's `pybridge:dev` as CRI
resolves it). Every step is keyed by a hash of its inputs (the Dockerfile's COPY sources for the
product) and skipped when its output already exists.

buildah runs with `--network host` in a private mount namespace with fresh tmpfs on /run and
/var/lib, its storage, config and temp files under build/kind-sim: a RUN step sets up no
network, and nothing lands in the machine's /run, /var/lib/containers, /etc or ruleset.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..bundle.rootfs import SUITE, apt_sources, copy_root, minbase_root

REPO = Path(__file__).resolve().parents[2]
BASE_DIR = Path(__file__).parent / "base"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DEBIAN_IMAGE = "docker.io/library/debian:bookworm-slim"
PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
DNSMASQ_IMAGE = "docker.io/library/pbt-dnsmasq:1"
PRODUCT_IMAGE = "docker.io/library/pybridge:dev"  # what CRI makes of the manifest's `pybridge:dev`
UPGRADE_IMAGE = "docker.io/library/pybridge:next"  # the same bundle plus a VERSION file: a new digest
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = "/run/pbt-host-ca.pem"  # beside the image's own bundle, which apt may rewrite
NEEDED_TOOLS = ("buildah", "debootstrap")


def missing_tools() -> list[str]:
    return [t for t in NEEDED_TOOLS if subprocess.run(["which", t], capture_output=True).returncode != 0]


@dataclass
class Builder:
    """buildah confined to `work` (build/kind-sim by default)."""

    work: Path = REPO / "build" / "kind-sim"

    def __post_init__(self) -> None:
        for sub in ("graph", "run", "tmp", "netconf", "archives"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        (self.work / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.work}/graph"\nrunroot = "{self.work}/run"\n'
        )
        # No CAP_SYS_RESOURCE on these machines: runc cannot raise nofile/nproc to podman's defaults.
        (self.work / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=32768:32768"]\n'
            f'[engine]\ntmp_dir = "{self.work}/tmp"\n[network]\nnetwork_config_dir = "{self.work}/netconf"\n'
        )
        # pip inside RUN trusts what the host trusts (a TLS-inspecting proxy's CA, where there is one).
        (self.work / "pip.conf").write_text(f"[global]\ncert = {BUILD_CA}\n")

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "CONTAINERS_STORAGE_CONF": str(self.work / "storage.conf"),
            "CONTAINERS_CONF": str(self.work / "containers.conf"),
            "TMPDIR": str(self.work / "tmp"),
        }

    def run(self, *argv: str | Path, timeout: float = 900) -> str:
        """argv in a private mount namespace with tmpfs on /run and /var/lib."""
        inner = "mount -t tmpfs pbt-run /run && mount -t tmpfs pbt-varlib /var/lib && exec " + " ".join(
            shlex.quote(str(a)) for a in argv
        )
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))} -> rc {proc.returncode}\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def exists(self, image: str) -> bool:
        try:
            self.run("buildah", "inspect", "--type", "image", image, timeout=60)
        except RuntimeError:
            return False
        return True

    def bud(self, tag: str, containerfile: Path, context: Path, *extra: str) -> None:
        self.run(
            "buildah",
            "bud",
            "--quiet",
            "--pull=never",
            "--network",
            "host",
            "--layers",
            "-v",
            f"{HOST_CA}:{BUILD_CA}:ro",
            "-v",
            f"{self.work / 'pip.conf'}:/etc/pip.conf:ro",
            *extra,
            "-t",
            tag,
            "-f",
            containerfile,
            context,
        )

    def archive(self, image: str, name: str, key: str) -> Path:
        """An OCI archive of `image` naming it `name`; kept per input key."""
        out = self.work / "archives" / f"{name.rsplit('/', 1)[-1].replace(':', '_')}-{key}.tar"
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            self.run("buildah", "push", "--quiet", image, f"oci-archive:{tmp}:{name}")
            tmp.rename(out)
        return out


def _hash_files(paths: list[Path], salt: str = "") -> str:
    digest = hashlib.sha256(salt.encode())
    for path in paths:
        files = (
            sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            if path.is_dir()
            else [path]
        )
        for f in files:
            digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def dockerfile_inputs(dockerfile: Path = DOCKERFILE) -> list[Path]:
    """The Dockerfile, its .dockerignore and every COPY source from the context (not --from)."""
    inputs = [dockerfile, dockerfile.with_name(dockerfile.name + ".dockerignore")]
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            inputs += [REPO / src for src in words[1:-1] if not src.startswith("--")]
    return [p for p in inputs if p.exists()]


def _debian_base(b: Builder) -> None:
    """tests/bundle's cached debootstrap minbase root, with updates and security sources."""
    if b.exists(DEBIAN_IMAGE):
        return
    rootfs = b.work / "rootfs"
    subprocess.run(["rm", "-rf", str(rootfs)], check=True)
    copy_root(minbase_root(), rootfs)  # hard links: files are replaced below, never written to
    sources = rootfs / "etc/apt/sources.list"
    sources.unlink()
    # the suites this machine's apt uses for bookworm (updates, security), from its own mirrors
    sources.write_text(
        "".join(
            f"deb {uri} {suite} main\n"
            for uri, suites in apt_sources()
            for suite in suites
            if suite.startswith(SUITE)
        )
    )
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        subprocess.run(["find", str(rootfs / cache), "-type", "f", "-delete"], check=True)
    tar = b.work / "rootfs.tar"
    subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    b.run(
        "sh",
        "-c",
        f"c=$(buildah from scratch) && buildah add $c {tar} / >/dev/null && "
        "buildah config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin $c"
        f" && buildah commit --quiet --rm $c {DEBIAN_IMAGE}",
    )
    subprocess.run(["rm", "-rf", str(rootfs), str(tar)], check=True)


def _layered(b: Builder, image: str, containerfile: Path) -> None:
    if not b.exists(image):
        b.bud(image, containerfile, BASE_DIR)


@dataclass
class Images:
    product: Path  # OCI archives, ready for `ctr images import`
    dnsmasq: Path
    upgrade: Path
    key: str


def _next_version(b: Builder, tag: str, key: str) -> str:
    """The product image with one more file in its bundle, so `install` sees a new version."""
    upgraded = f"localhost/pybridge:kindsim-{key}-next"
    if not b.exists(upgraded):
        version = b.work / "tmp" / "VERSION"
        version.write_text(f"{key}-next\n")
        b.run(
            "sh",
            "-c",
            f"c=$(buildah from --pull=never {tag}) && "
            f"buildah copy $c {version} /opt/pybridge/bundle/VERSION >/dev/null && "
            f"buildah commit --quiet --rm $c {upgraded}",
        )
    return upgraded


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Two suites in one tree must not build into one storage at once."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_all(b: Builder | None = None, log: object = print) -> Images:
    b = b or Builder()
    with _locked(b.work):
        started = time.monotonic()
        _debian_base(b)
        _layered(b, PYTHON_IMAGE, BASE_DIR / "python.Containerfile")
        _layered(b, DNSMASQ_IMAGE, BASE_DIR / "dnsmasq.Containerfile")
        key = _hash_files(dockerfile_inputs())
        tag = f"localhost/pybridge:kindsim-{key}"
        if not b.exists(tag):
            b.bud(tag, DOCKERFILE, REPO, "--ignorefile", str(DOCKERFILE) + ".dockerignore")
        product = b.archive(tag, PRODUCT_IMAGE, key)
        upgrade = b.archive(_next_version(b, tag, key), UPGRADE_IMAGE, key)
        dnsmasq = b.archive(DNSMASQ_IMAGE, DNSMASQ_IMAGE, _hash_files([BASE_DIR]))
        log(f"images ready in {time.monotonic() - started:.1f}s (pybridge {key})")  # type: ignore[operator]
        return Images(product, dnsmasq, upgrade, key)


if __name__ == "__main__":
    build_all()
