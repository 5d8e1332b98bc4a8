"""Chains whose plugins all take the conflist's cniVersion: VERSION asked with a bounded wait
(cni_plugin/chain.py), the node controller's pick (model.chain_version) and `pybridge doctor`'s check."""

from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import chain
from cni_plugin.node import controller, model
from cni_plugin.ops import doctor

DEBIAN_PORTMAP = "/usr/lib/cni/portmap"  # containernetworking-plugins 1.1.1: speaks up to 1.0.0
UP_TO_100 = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
HANG = 60  # seconds a hanging fake plugin sleeps; every test here waits far less


def fake_plugin(bin_dir: Path, name: str, versions: tuple[str, ...] | None = None, hang: bool = False,
                reply: str | None = None) -> Path:
    """A plugin answering VERSION with `versions`, or `reply` as is, or never (it sleeps)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    if hang:
        body = f"sleep {HANG}"
    else:
        text = reply if reply is not None else json.dumps({"cniVersion": "1.0.0",
                                                           "supportedVersions": versions})
        body = f"cat >/dev/null; printf '%s' '{text}'"
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_probe_reads_supported_versions(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "old", UP_TO_100)
    found = chain.probe("old", [str(tmp_path / "nope"), str(tmp_path)])
    assert found == chain.Probe("old", str(tmp_path / "old"), UP_TO_100)
    assert found.takes("1.0.0") is True and found.takes("1.1.0") is False


def test_a_hanging_plugin_is_timed_out_not_waited_on(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "stuck", hang=True)
    started = time.monotonic()
    found = chain.probe("stuck", [str(tmp_path)], timeout=0.5)
    assert time.monotonic() - started < 5
    assert found.versions is None and found.problem == "no answer to VERSION within 0.5 s"
    assert found.takes("1.1.0") is None


@pytest.mark.parametrize("reply", ["", "not json", '{"supportedVersions": "1.0.0"}',
                                   '{"supportedVersions": []}', '{"supportedVersions": [1]}', "[]"])
def test_a_bad_version_reply_is_reported(tmp_path: Path, reply: str) -> None:
    fake_plugin(tmp_path, "odd", reply=reply)
    found = chain.probe("odd", [str(tmp_path)])
    assert found.versions is None and "no supportedVersions" in found.problem


def test_missing_or_unrunnable_plugins(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")  # not executable: libcni would not run it either
    assert chain.probe("plain", [str(tmp_path)]).problem == f"not found in {tmp_path}"
    assert chain.probe("../etc", [str(tmp_path)]).problem.startswith("not found")


def test_cache_asks_again_only_when_the_plugin_changes(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "p", UP_TO_100)
    cache = chain.Cache([str(tmp_path)])
    assert cache.probe("p").versions == UP_TO_100
    fake_plugin(tmp_path / "other", "p", ("1.1.0",))
    os.replace(tmp_path / "other" / "p", tmp_path / "p")  # an upgrade: a new file
    assert cache.probe("p").versions == ("1.1.0",)
    assert cache.probe("pybridge").versions == model.CNI_VERSIONS  # its own: never exec'd


@pytest.mark.parametrize(("ceiling", "offered", "expected"), [
    ("1.1.0", [UP_TO_100], "1.0.0"),
    ("1.1.0", [UP_TO_100, ("0.3.1", "0.4.0")], "0.4.0"),
    ("1.0.0", [model.CNI_VERSIONS], "1.0.0"),
    ("1.1.0", [("0.1.0", "0.2.0")], None),  # pybridge speaks 0.3.0 and up
])
def test_newest_common(ceiling: str, offered: list[tuple[str, ...]], expected: str | None) -> None:
    probes = [chain.Probe(f"p{i}", versions=v) for i, v in enumerate(offered)]
    assert chain.newest_common(ceiling, probes, model.CNI_VERSIONS) == expected


def own_node(runtime: str = "containerd://2.1.9", max_pods: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}],
                              "nodeInfo": {"containerRuntimeVersion": runtime}}
    if max_pods is not None:
        status["capacity"] = {"pods": max_pods}
    return {"metadata": {"name": "n1"}, "spec": {"podCIDRs": ["10.70.1.0/24"]}, "status": status}


CLUSTER = (ipaddress.ip_network("10.70.0.0/16"),)  # the node controller uses podCIDRs inside it only


class Recorder:
    def __init__(self) -> None:
        self.plans: list[model.Desired] = []

    def routes(self) -> set[model.Route]:
        return set()

    def foreign_routes(self) -> set[str]:
        return set()

    def mtu(self, node: model.Node | None) -> int | None:
        return None

    def apply(self, plan: model.Desired) -> list[str]:
        self.plans.append(plan)
        return []

    def resync(self) -> None:
        pass


@pytest.mark.skipif(not os.access(DEBIAN_PORTMAP, os.X_OK),
                    reason="Debian's containernetworking-plugins missing")
def test_node_agent_steps_down_for_debians_portmap_and_says_why(capfd: pytest.CaptureFixture[str]) -> None:
    """containerd 2.x takes 1.1.0, Debian 12's portmap 1.1.1 does not: a 1.1.0 conflist would fail
    every pod at portmap and leak what pybridge reserved (its DEL never comes)."""
    effects = Recorder()
    plugins = chain.Cache([os.path.dirname(DEBIAN_PORTMAP)])
    agent = controller.NodeController(model.Settings("n1", CLUSTER), effects, plugins=plugins)
    agent.handle("SYNC", [own_node()])
    agent.handle("MODIFIED", own_node())
    conf = effects.plans[-1].conflist
    assert conf is not None and [p["type"] for p in conf["plugins"]] == ["pybridge", "portmap"]
    assert conf["cniVersion"] == "1.0.0"
    portmap = chain.probe("portmap", [os.path.dirname(DEBIAN_PORTMAP)])
    assert portmap.takes(conf["cniVersion"]) and not portmap.takes("1.1.0")
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    notes = [n["note"] for n in lines if n.get("event") == "note" and n.get("level") == "warning"]
    assert len(notes) == 1, lines  # logged once, not at every reconcile
    assert notes[0].startswith(f"cniVersion 1.0.0 instead of 1.1.0: portmap ({DEBIAN_PORTMAP}) supports ")


def test_node_agent_keeps_the_version_when_a_plugin_cannot_be_asked(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "portmap", hang=True)
    effects = Recorder()
    agent = controller.NodeController(model.Settings("n1", CLUSTER), effects,
                          plugins=chain.Cache([str(tmp_path)], timeout=0.3))
    plan = agent.handle("SYNC", [own_node()])
    assert plan.conflist is not None and plan.conflist["cniVersion"] == "1.1.0"
    assert plan.notes == [f"chained plugin portmap ({tmp_path}/portmap): no answer to VERSION within 0.3 s"]


def test_no_common_version_writes_no_conflist(tmp_path: Path) -> None:
    fake_plugin(tmp_path, "portmap", ("0.1.0", "0.2.0"))
    effects = Recorder()
    agent = controller.NodeController(model.Settings("n1", CLUSTER, cni_version="1.0.0"), effects,
                          plugins=chain.Cache([str(tmp_path)]))
    plan = agent.handle("SYNC", [own_node()])
    assert plan.conflist is None and effects.plans == []
    assert plan.waiting is not None and plan.waiting.startswith("cniVersion none instead of 1.0.0: portmap")


@pytest.mark.parametrize(("max_pods", "warned"),
                         [("110", False), ("254", True), ("bogus", False), (None, False)])
def test_pod_cidr_smaller_than_max_pods_is_noted(max_pods: str | None, warned: bool) -> None:
    own = model.node_from_object(own_node(max_pods=max_pods))
    plan = model.desired(model.Settings("n1", CLUSTER), [own], (), None)
    expected = [f"pod CIDR 10.70.1.0/24 holds 253 pod addresses, fewer than the node's maxPods {max_pods} "
                "(status.capacity.pods): ADDs past 253 pods fail with code 110"]
    assert plan.notes == (expected if warned else [])


def _conflist(conf_dir: Path, file: str, version: str, *types: str) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / file).write_text(json.dumps({"cniVersion": version, "name": file.split(".")[0],
                                             "plugins": [{"type": t} for t in types]}))


def test_doctor_reports_each_plugin_that_rejects_or_hangs(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "VERSION_TIMEOUT", 0.5)
    bins, confs = tmp_path / "bin", tmp_path / "net.d"
    fake_plugin(bins, "newer", ("1.0.0", "1.1.0"))
    fake_plugin(bins, "older", UP_TO_100)
    fake_plugin(bins, "stuck", hang=True)
    _conflist(confs, "10-used.conflist", "1.1.0", "newer", "older")
    _conflist(confs, "20-other.conflist", "1.0.0", "newer", "stuck")
    started = time.monotonic()
    check = doctor.check_chains(doctor.Node(conf_dir=str(confs), bin_dir=str(bins)))
    assert time.monotonic() - started < 10
    assert check.status == doctor.FAIL
    used, other = check.message.split(" | ")
    assert used.startswith(f"{confs}/10-used.conflist (cniVersion 1.1.0): older ({bins}/older) supports ")
    assert "[fix: set cniVersion to 1.0.0, or upgrade the plugin" in used
    assert "newer" not in used.split("[fix")[0].replace("10-used", "")
    assert other.startswith(f"{confs}/20-other.conflist (cniVersion 1.0.0): stuck ({bins}/stuck): "
                            "no answer to VERSION within 0.5 s")


def test_doctor_chains_ok_and_warns_for_unused_conflists(tmp_path: Path) -> None:
    bins, confs = tmp_path / "bin", tmp_path / "net.d"
    fake_plugin(bins, "newer", ("1.0.0", "1.1.0"))
    fake_plugin(bins, "older", UP_TO_100)
    _conflist(confs, "10-used.conflist", "1.1.0", "newer", "missing")  # missing: the conflist check's
    node = doctor.Node(conf_dir=str(confs), bin_dir=str(bins))
    assert doctor.check_chains(node).status == doctor.OK
    _conflist(confs, "20-other.conflist", "1.1.0", "older")
    assert doctor.check_chains(doctor.Node(conf_dir=str(confs), bin_dir=str(bins))).status == doctor.WARN
