"""IPAM delegation both ways with the reference plugins, and per-call logging."""

from __future__ import annotations

import json
import os

import pytest

from testbed.harness import REFERENCE_PLUGINS, Host, bridge_conf

pytestmark = pytest.mark.netns

needs_reference = pytest.mark.skipif(
    not os.path.exists(os.path.join(REFERENCE_PLUGINS, "bridge")),
    reason="Debian containernetworking-plugins not installed")


@needs_reference
def test_reference_bridge_uses_pyipam_through_cni_path(host: Host) -> None:
    conf = bridge_conf(host, cniVersion="1.0.0", type="bridge")
    a, b = host.new_pod(), host.new_pod()
    ra = host.cni("ADD", conf, a, "ref-a", plugin="bridge")
    rb = host.cni("ADD", conf, b, "ref-b", plugin="bridge")
    assert ra.ok and rb.ok, (ra.stdout, rb.stdout)
    ip_b = rb.out["ips"][0]["address"].split("/")[0]
    assert host.ping(a, ip_b)
    assert sorted(host.reservations("testnet").values()) == ["ref-a\r\neth0", "ref-b\r\neth0"]
    assert host.cni("DEL", conf, a, "ref-a", plugin="bridge").ok
    assert list(host.reservations("testnet").values()) == ["ref-b\r\neth0"]


@needs_reference
def test_pybridge_uses_host_local_and_shares_its_store(host: Host) -> None:
    conf = bridge_conf(host, cniVersion="1.0.0")
    conf["ipam"]["type"] = "host-local"
    first = host.add(conf, host.new_pod(), "hl-1")
    # pyipam reading the same store must skip the address host-local handed out.
    conf_pyipam = {**conf, "ipam": {**conf["ipam"], "type": "pyipam"}}
    second = host.add(conf_pyipam, host.new_pod(), "py-2")
    assert first["ips"][0]["address"] != second["ips"][0]["address"]
    assert host.cni("DEL", conf, container_id="hl-1", netns_path="").ok
    assert list(host.reservations("testnet").values()) == ["py-2\r\neth0"]


def test_each_call_is_logged_as_json_to_the_log_file(host: Host) -> None:
    log_file = host.data_dir.parent / "pybridge.log"
    conf = bridge_conf(host, logFile=str(log_file))
    pod = host.new_pod()
    host.add(conf, pod, "logged")
    host.cni("ADD", conf, pod, "logged")  # fails: eth0 exists
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    calls = [line for line in lines if line["event"] == "cni_call"]
    assert [c["code"] for c in calls] == [0, 999]
    assert calls[0]["verb"] == "ADD" and calls[0]["container_id"] == "logged"
    assert calls[0]["ifname"] == "eth0" and calls[0]["netns"] == f"/run/netns/{pod}"
    assert calls[0]["duration_ms"] > 0
    assert oct(log_file.stat().st_mode & 0o777) == oct(0o600)
