"""pybridge under today's libcni (Debian unstable's, e.g. 1.3.0; its version in the test id): spec
1.1.0 results, and STATUS and GC as libcni itself makes them, which Debian 12's libcni 1.1.2 cannot
(test_libcni.py, test_gc_status.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.harness import Host, delete_netns, pod_json

from .drive import Libcni, conflist, has_nat_rules, kernel_matches

pytestmark = pytest.mark.interop

NET = "sid110"


def test_add_110_check_status_gc_del(
    host: Host, make_libcni: Callable[..., Libcni], sid_cnidrive: Path
) -> None:
    libcni = make_libcni(host, binary=sid_cnidrive)
    listed = conflist(host, NET, "1.1.0", ipMasq=True, ipMasqBackend="nftables")
    net = libcni.write(listed)
    assert "1.1.0" in libcni.ok("version", net)["pybridge"]
    assert libcni.run("status", net).ok
    pods = {cid: host.new_pod() for cid in ("keep", "lost-cached", "lost-uncached")}

    results = {cid: libcni.ok("add", net, pods[cid], container_id=cid) for cid in ("keep", "lost-cached")}
    for cid, result in results.items():
        assert result["cniVersion"] == "1.1.0"  # libcni 1.1.2 rejects this result
        assert libcni.ok("cached", net, pods[cid], container_id=cid) == result
        kernel_matches(host, pods[cid], result)
        check = libcni.run("check", net, pods[cid], container_id=cid)
        assert check.ok, check.stderr
        assert has_nat_rules(host, NET, cid)
    # An attachment libcni never cached (a runtime's lost state): only pybridge's GC can free it.
    plugin = {**listed["plugins"][0], "cniVersion": "1.1.0", "name": NET}
    host.add(plugin, pods["lost-uncached"], "lost-uncached")
    host.pods.remove(pods["lost-uncached"])
    delete_netns(pods["lost-uncached"])
    assert sorted(host.reservations(NET).values()) == [
        "keep\r\neth0", "lost-cached\r\neth0", "lost-uncached\r\neth0"]
    assert libcni.run("status", net).ok

    gc = libcni.run("gc", net, valid=[{"containerID": "keep", "ifname": "eth0"}])
    assert gc.ok, gc.stderr
    # libcni DELed what it had cached and was not valid; pybridge's GC freed the rest.
    assert libcni.cache_files() == [f"{NET}-keep-eth0"]
    assert list(host.reservations(NET).values()) == ["keep\r\neth0"]
    assert not has_nat_rules(host, NET, "lost-cached") and not has_nat_rules(host, NET, "lost-uncached")
    assert results["lost-cached"]["interfaces"][1]["name"] not in host.links()
    assert all(link["ifname"] != "eth0" for link in pod_json(host, pods["lost-cached"], "link", "show"))
    # The valid attachment is untouched.
    kernel_matches(host, pods["keep"], results["keep"])
    assert has_nat_rules(host, NET, "keep")
    assert libcni.run("check", net, pods["keep"], container_id="keep").ok
    assert host.ping(pods["keep"], "10.66.0.1")

    libcni.ok("del", net, pods["keep"], container_id="keep")
    assert libcni.cache_files() == []
    assert host.reservations(NET) == {}
    assert not has_nat_rules(host, NET, "keep")
    assert results["keep"]["interfaces"][1]["name"] not in host.links()
    assert libcni.run("status", net).ok


def test_status_passes_pybridge_refusal_on(
    host: Host, make_libcni: Callable[..., Libcni], sid_cnidrive: Path
) -> None:
    """What containerd 2.x turns into NetworkReady=false: a STATUS error, code and message intact."""
    libcni = make_libcni(host, binary=sid_cnidrive)
    net = libcni.write(conflist(host, "sidbad", "1.1.0", bridge="br-sidbad"))
    host.exec("ip", "link", "add", "br-sidbad", "type", "veth", "peer", "name", "sidbad-peer")
    status = libcni.run("status", net)
    assert not status.ok
    assert b"br-sidbad already exists but is not a bridge" in status.stderr, status.stderr
    host.exec("ip", "link", "del", "br-sidbad")
    assert libcni.run("status", net).ok
