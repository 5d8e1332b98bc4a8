"""The node controller says why it cannot reach the API: 401, TLS and refused connections are logged.

`pybridge node run` (this venv's, with a kubeconfig) runs in the world netns against the fake API
server, once with a wrong token, once trusting another CA, once at a port nobody listens on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cluster import Cluster
from .world import API_PORT, GATEWAY, make_pki

pytestmark = pytest.mark.kindsim


def kubeconfig(path: Path, server: str, ca: Path, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sim", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "agent"}}],
        "current-context": "sim",
    }
    path.write_text(json.dumps(config))
    return path


def first_complaint(cluster: Cluster, config: Path, conf_dir: Path, timeout: float = 30) -> dict[str, object]:
    """The node controller's first api_error or retry log event."""
    node_run = f"-m cni_plugin node run --node-name nowhere --kubeconfig {config} --cni-conf-dir {conf_dir}"
    argv = ["nsenter", f"--net=/run/netns/{cluster.world.netns}", sys.executable, *node_run.split()]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") in ("api_error", "retry"):
                return event
            assert time.monotonic() < deadline, f"no complaint within {timeout}s"
        raise AssertionError(f"the node controller exited with {proc.wait()} without a complaint")
    finally:
        proc.kill()
        proc.wait(10)


def test_refusals_are_logged_with_their_cause(cluster: Cluster, tmp_path: Path) -> None:
    ca = cluster.root / "pki" / "ca.crt"
    server = f"https://{GATEWAY}:{API_PORT}"
    wrong_token = first_complaint(cluster, kubeconfig(tmp_path / "a", server, ca, "not-the-token"), tmp_path)
    assert wrong_token["event"] == "api_error" and wrong_token["status"] == 401, wrong_token
    other_ca, _, _ = make_pki(tmp_path / "other-pki", GATEWAY)
    untrusted = first_complaint(
        cluster, kubeconfig(tmp_path / "b", server, other_ca, cluster.token), tmp_path
    )
    assert untrusted["event"] == "retry" and "CERTIFICATE_VERIFY_FAILED" in str(untrusted["error"]), untrusted
    closed = f"https://{GATEWAY}:{API_PORT + 1}"
    refused = first_complaint(cluster, kubeconfig(tmp_path / "c", closed, ca, cluster.token), tmp_path)
    assert refused["event"] == "retry" and "refused" in str(refused["error"]).lower(), refused
    assert not list(tmp_path.glob("*.conflist")), "nothing may be written without the API"
