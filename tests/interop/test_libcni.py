"""pybridge under the real client library: libcni 1.1.2 (cnidrive) and go-cni 1.1.7 (go test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from testbed.harness import Host, pod_json

from .drive import GoTools, Libcni, conflist, kernel_matches

pytestmark = pytest.mark.interop

LIBCNI_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]


@pytest.mark.parametrize("version", LIBCNI_VERSIONS)
def test_libcni_add_check_del_per_version(host: Host, libcni: Libcni, version: str) -> None:
    conf = conflist(host, f"v{version.replace('.', '')}", version)
    conf["plugins"][0]["ipam"]["routes"] = [{"dst": "192.0.2.0/24"}]  # no gw: the gateway's
    net = libcni.write(conf)
    pod = host.new_pod()
    result = libcni.ok("add", net, pod)
    assert pod_json(host, pod, "route", "show", "192.0.2.0/24")[0]["gateway"] == "10.66.0.1"
    assert result["cniVersion"] == version
    assert [i["name"] for i in result["interfaces"]][::2] == ["br-interop", "eth0"]
    assert result["ips"][0]["interface"] == 2
    assert ("version" in result["ips"][0]) == version.startswith("0.")  # libcni's conversion
    assert libcni.ok("cached", net, pod) == result
    assert libcni.cache_files() == [f"{net}-c1-eth0"]
    kernel_matches(host, pod, result)
    check = libcni.run("check", net, pod)
    if version.startswith("0.3"):
        # libcni itself refuses CHECK below 0.4.0; the plugin is never called.
        assert not check.ok and b"does not support the CHECK command" in check.stderr
    else:
        assert check.ok, check.stderr  # libcni injected the cached result as prevResult
    veth = result["interfaces"][1]["name"]
    libcni.ok("del", net, pod)
    assert libcni.cache_files() == []
    libcni.ok("del", net, pod)
    assert host.reservations(net) == {}
    assert veth not in host.links()
    assert all(link["ifname"] != "eth0" for link in pod_json(host, pod, "link", "show"))


def test_libcni_112_cannot_parse_a_110_result_and_its_del_cleans_up(host: Host, libcni: Libcni) -> None:
    """libcni 1.1.2 predates spec 1.1.0 (libcni >= 1.2 reads it): the ADD reaches pybridge, which
    answers in 1.1.0, and libcni rejects the result. The DEL a runtime then sends must clean up."""
    net = libcni.write(conflist(host, "v110", "1.1.0"))
    assert "1.1.0" in libcni.ok("version", net)["pybridge"]
    pod = host.new_pod()
    reply = libcni.run("add", net, pod)
    assert not reply.ok
    assert b'unsupported CNI result version "1.1.0"' in reply.stderr
    assert len(host.reservations(net)) == 1  # pybridge did attach
    libcni.ok("del", net, pod)
    assert host.reservations(net) == {}
    assert all(link["ifname"] != "eth0" for link in pod_json(host, pod, "link", "show"))
    assert not [name for name in host.links() if name.startswith("veth")]


def test_capability_args_ips_and_mac_through_runtime_config(host: Host, libcni: Libcni) -> None:
    net = libcni.write(conflist(host, "caps", "1.0.0", capabilities={"ips": True, "mac": True}))
    pod = host.new_pod()
    cap = {"ips": ["10.66.0.77/24"], "mac": "02:66:00:00:00:77",
           "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    result = libcni.ok("add", net, pod, cap=cap)
    assert result["ips"][0]["address"] == "10.66.0.77/24"
    assert result["interfaces"][2]["mac"] == "02:66:00:00:00:77"
    kernel_matches(host, pod, result)
    assert libcni.run("check", net, pod, cap=cap).ok
    assert list(host.reservations(net)) == ["10.66.0.77"]
    libcni.ok("del", net, pod, cap=cap)
    assert host.reservations(net) == {}


def test_validate_reports_pybridge_capabilities(host: Host, libcni: Libcni) -> None:
    portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
    net = libcni.write(conflist(host, "val", "1.0.0", portmap, capabilities={"ips": True, "mac": True}))
    assert sorted(libcni.ok("validate", net)["capabilities"]) == ["ips", "mac", "portMappings"]


def test_go_cni_setup_check_remove_like_containerd_cri(
    host: Host, libcni: Libcni, go_tools: GoTools, tmp_path: Path
) -> None:
    net = libcni.write(conflist(host, "gocni", "1.0.0", capabilities={"ips": True, "mac": True}))
    env = {
        "CNI_PATH": libcni.cni_path,
        "PYBRIDGE_GOCNI_CONFDIR": str(libcni.conf_dir),
        "PYBRIDGE_GOCNI_NETWORK": net,
        "PYBRIDGE_GOCNI_NETNS_A": f"/run/netns/{host.new_pod()}",
        "PYBRIDGE_GOCNI_NETNS_B": f"/run/netns/{host.new_pod()}",
        "PYBRIDGE_AGENT_SOCKET": str(host.agent_socket),
        "PATH": os.environ["PATH"],
    }
    # go-cni has no cache-dir option: libcni's /var/lib/cni is a tmpfs in a private mount ns.
    script = 'mount -t tmpfs -o size=16m pbt-gocni-cache /var/lib && exec "$@"'
    proc = host.exec("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                     "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                     str(go_tools.gocni_test), "-test.v", "-test.count=1", check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    for name in ("TestCRISetupRemove", "TestSetupCheckRemove"):
        assert f"--- PASS: {name}" in out, out
    # go-cni's Remove hides "not found" errors: look at what is left.
    assert host.reservations(net) == {}
    assert not [name for name in host.links() if name.startswith("veth")]
    (tmp_path / "gocni.log").write_text(json.dumps(out))
