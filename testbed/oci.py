"""Local OCI images for the containerd tier, built from Debian's busybox-static (no registry).

`build()` writes an OCI image-layout archive (oci-layout, index.json, blobs/sha256/...) that
`ctr images import` accepts; the image reference rides in the index annotation
`io.containerd.image.name`. Timestamps are zero, so one input gives one digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = "/bin/busybox"
# A pause-like sandbox: sleeps until TERM/INT, then exits 0 (the real pause does the same).
PAUSE_ENTRYPOINT = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]


def _member(tf: tarfile.TarFile, name: str, kind: bytes, mode: int, data: bytes = b"",
            link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname, info.size = kind, mode, 0, link, len(data)
    tf.addfile(info, io.BytesIO(data) if data else None)


def rootfs_layer() -> bytes:
    """An uncompressed layer: busybox-static, one symlink per applet, passwd and group."""
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for directory in ("bin", "dev", "etc", "proc", "sys", "root", "run", "var", "usr", "usr/bin", "sbin"):
            _member(tf, directory, tarfile.DIRTYPE, 0o755)
        _member(tf, "tmp", tarfile.DIRTYPE, 0o1777)
        _member(tf, "bin/busybox", tarfile.REGTYPE, 0o755, Path(BUSYBOX).read_bytes())
        for applet in sorted(set(applets) - {"busybox"}):
            _member(tf, f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        _member(tf, "etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        _member(tf, "etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
    return buf.getvalue()


def _blob(tf: tarfile.TarFile, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    _member(tf, f"blobs/sha256/{digest}", tarfile.REGTYPE, 0o644, data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build(reference: str, out: Path, entrypoint: list[str] | None = None, layer: bytes | None = None) -> Path:
    """Write the image `reference` (e.g. pbt.local/busybox:1) to the archive `out`."""
    layer = layer if layer is not None else rootfs_layer()
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/",
                   "Entrypoint": entrypoint, "Cmd": None if entrypoint else ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "oci-layout", tarfile.REGTYPE, 0o644, b'{"imageLayoutVersion": "1.0.0"}')
        layer_desc = _blob(tf, gzip.compress(layer, mtime=0))
        config_desc = _blob(tf, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_desc}],
        }
        manifest_desc = _blob(tf, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_desc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": reference,
                                "org.opencontainers.image.ref.name": reference.rsplit(":", 1)[-1]},
            }],
        }
        _member(tf, "index.json", tarfile.REGTYPE, 0o644, json.dumps(index).encode())
    return out
