"""Crash trials: kill -9 the plugin, its launcher or the agent mid-ADD; "reboot" the node.

After every kill the runtime's follow-up (DEL, or GC with the surviving pods) must leave no
leaked address, host veth, masquerade rule, duplicate address, ghost store file or lock holder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from testbed.harness import Host, bridge_conf, delete_netns, sh

from .conftest import HostFactory, record, scale
from .crash import KILL_AGENT, KILL_CLIENT, KILL_PLUGIN, run_trials
from .ledger import Pod, addresses_of, census


def _conf(host: Host) -> dict[str, Any]:
    conf = bridge_conf(host, ipMasq=True, isDefaultGateway=True)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]]
    return conf


def _full(host: Host, conf: dict[str, Any], size: int) -> None:
    """A full pool refuses the next ADD, naming its use; STATUS stays ok (a full pool is not a
    node fault: containerd 2.x would take any STATUS error for a dead network)."""
    status = host.cni("STATUS", conf)
    assert status.ok, status.stdout
    refused = host.cni("ADD", conf, host.new_pod(), "one-too-many")
    assert refused.out["code"] == 110 and f"{size} of {size} in use" in refused.out["msg"], refused.stdout


@pytest.mark.parametrize("what", [KILL_PLUGIN, KILL_CLIENT, KILL_AGENT])
def test_kill_minus_nine_mid_add_leaks_nothing(make_host: HostFactory, tmp_path: Path, what: str) -> None:
    host = make_host(agent=what != KILL_PLUGIN)
    trials = scale(12, 200)
    out = run_trials(host, _conf(host), what, trials, seed=hash(what) & 0xFFFF, logs=tmp_path)
    record(f"crash[{what}]", trials=out.trials, kill_points=dict(sorted(out.kill_points.items())),
           completed=out.completed, dels=out.dels, left_to_gc=out.left_to_gc,
           del_errors=len(out.del_errors), leaks_after_del=dict(out.leaks_after_del),
           census=out.census, max_delay_ms=max(out.delays_ms))
    for log in tmp_path.glob("agent-restart-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()
    assert out.del_errors == []
    assert not any(out.leaks_after_del.values()), dataclasses.asdict(out)
    assert not any(out.census.values()), out.census


def test_reboot_wipes_links_behind_the_store_and_gc_makes_the_pool_whole(
    make_host: HostFactory,
) -> None:
    host = make_host()
    conf = bridge_conf(host, ipMasq=True)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/29"}]]  # 5 addresses: .2 - .6
    for i in range(5):
        host.add(conf, host.new_pod(), f"before-{i}")
    _full(host, conf, 5)
    # The reboot: every pod netns, veth, bridge and rule is gone; the store on disk is not.
    for pod in list(host.pods):
        host.pods.remove(pod)
        delete_netns(pod)
    delete_netns(host.name)
    sh("ip", "netns", "add", host.name)
    host.exec("ip", "link", "set", "lo", "up")
    assert len(host.reservations("testnet")) == 5
    _full(host, conf, 5)
    # A GC after the restart (no runtime sends one: an operator's) with the pods the runtime
    # knows of (none yet).
    assert host.cni("GC", {**conf, "cni.dev/valid-attachments": []}).ok
    assert host.reservations("testnet") == {}
    assert host.cni("STATUS", conf).ok
    pods = [Pod(host.new_pod(), f"after-{i}") for i in range(5)]
    for after in pods:
        after.addresses = addresses_of(host.add(conf, after.netns, after.container_id))
    counts = census(host, "testnet", pods)
    record("reboot", pool=5, reserved_before_gc=5, released_by_gc=5, census=counts)
    assert not any(counts.values()), counts


def test_reboot_with_a_tmpfs_data_dir_needs_no_gc(make_host: HostFactory, tmp_path: Path) -> None:
    """kindnet's choice: the store on tmpfs vanishes with the pods it described."""
    host = make_host()
    run = tmp_path / "run"
    run.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(run))
    try:
        conf = bridge_conf(host)
        conf["ipam"]["dataDir"] = str(run / "cni-ipam-state")
        conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/29"}]]
        for i in range(5):
            host.add(conf, host.new_pod(), f"before-{i}")
        _full(host, conf, 5)
        sh("umount", str(run))
        sh("mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(run))  # the reboot
        assert host.cni("STATUS", conf).ok
        host.add(conf, host.new_pod(), "after")
    finally:
        sh("umount", str(run), check=False)

