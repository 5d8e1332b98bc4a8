"""What the node controller imports before its first list: not the Kubernetes client's generated
API classes (kubernetes 37: ~2.5 s and hundreds of pydantic models on a loaded node), which its
list and watch calls do without (kube.lister)."""

from __future__ import annotations

import subprocess
import sys


def test_the_node_controller_lists_without_the_generated_api_classes() -> None:
    code = (
        "import sys, threading\n"
        "from kubernetes import client\n"
        "from cni_plugin.node import kube\n"
        "from cni_plugin.node.netpol import policy_controller\n"
        "cfg = client.Configuration(); cfg.host = 'http://apiserver.invalid'\n"
        "api = client.ApiClient(cfg)\n"
        "streams = policy_controller.listers(api, threading.Event())\n"
        "kube.node_events(api)\n"
        "print(len(streams), sorted(m for m in sys.modules if m.startswith('kubernetes.client.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, modules = out.split(" ", 1)
    assert count == "4"
    assert "kubernetes.client.api_client" in modules  # the client itself is used
    assert "kubernetes.client.api." not in modules
    assert "kubernetes.client.models." not in modules
