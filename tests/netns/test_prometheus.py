"""A real Prometheus (Debian's `prometheus`) scrapes the agent inside the test's host netns; asked
through its own HTTP API, the call counters equal the calls the test made and the pool gauges equal
what `pyipam ls` shows. Skipped without the package, except on CI (.ci/run sets
PYBRIDGE_REQUIRE_PROMETHEUS=1 and installs it)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin.node.netpol.nft import TABLE
from testbed.harness import Host

from .netpol_cases import POD_A, ns_policy
from .nodecontroller import METRICS_PORT as NODE_METRICS_PORT
from .nodecontroller import NodeWorld, node_world, reached
from .ops import METRICS_PORT, agent_env, http_get, ops_conf, restart_agent, write_conf

pytestmark = pytest.mark.netns

REQUIRE = os.environ.get("PYBRIDGE_REQUIRE_PROMETHEUS") == "1"
PROMETHEUS_PORT = 19090
CONFIG = """global:
  scrape_interval: 1s
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def query(host: Host, expr: str) -> float | None:
    """The single value of an instant query, or None while Prometheus has none."""
    ok, body = http_get(host, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), PROMETHEUS_PORT)
    reply = json.loads(body) if ok else {}
    result = reply["data"]["result"] if reply.get("status") == "success" else []
    return float(result[0]["value"][1]) if len(result) == 1 else None


def wait_for(host: Host, expr: str, expected: float, timeout: float = 30.0) -> float | None:
    deadline = time.monotonic() + timeout
    while (value := query(host, expr)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


@contextlib.contextmanager
def running_prometheus(host: Host, tmp_path: Path, job: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Debian's prometheus in the host netns, scraping 127.0.0.1:`port` there as `job`."""
    binary = shutil.which("prometheus")
    if binary is None:
        if REQUIRE:
            pytest.fail("PYBRIDGE_REQUIRE_PROMETHEUS=1 but `prometheus` is not installed")
        pytest.skip("`prometheus` not installed (apt-get install prometheus)")
    (tmp_path / "prometheus.yml").write_text(CONFIG.format(job=job, port=port))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(["ip", "netns", "exec", host.name, binary,
                             f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not http_get(host, "/-/ready", PROMETHEUS_PORT)[0]:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def prometheus(host: Host, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    if host.agent is None:
        pytest.skip("scrapes the agent: agent mode only")
    with running_prometheus(host, tmp_path, "pybridge-agent", METRICS_PORT) as proc:
        yield proc


def _pyipam_ls(host: Host) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "ipam", "ls", "--data-dir", str(host.data_dir),
                          "--network", "testnet"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[1:]


@pytest.mark.usefixtures("prometheus")
def test_prometheus_scrapes_the_agent(host: Host, tmp_path: Path) -> None:
    conf = ops_conf(host)
    conf_dir = write_conf(tmp_path / "conf", conf)
    restart_agent(host, tmp_path / "agent-prom.log", agent_env(conf_dir))
    pods = [host.new_pod() for _ in range(4)]
    results = [host.add(conf, pod, container_id=f"p{i}") for i, pod in enumerate(pods)]
    assert host.cni("DEL", conf, pods[0], container_id="p0").ok
    assert host.cni("CHECK", {**conf, "prevResult": results[1]}, pods[1], container_id="p1").ok

    calls = 'pybridge_cni_calls_total{job="pybridge-agent",program="pybridge",verb="%s",code="0"}'
    assert wait_for(host, calls % "ADD", 4) == 4
    assert query(host, calls % "DEL") == 1
    assert query(host, calls % "CHECK") == 1
    assert query(host, 'sum(pybridge_cni_operation_duration_seconds_count{verb="ADD"})') == 4
    assert query(host, 'sum(pybridge_cni_operation_duration_seconds_count{verb="DEL"})') == 1
    reserved = len(_pyipam_ls(host))
    assert reserved == 3
    assert wait_for(host, 'pybridge_ipam_reserved_addresses{network="testnet"}', reserved) == reserved
    assert query(host, 'pybridge_ipam_free_addresses{network="testnet"}') == 253 - reserved
    assert query(host, 'pybridge_ipam_pool_addresses{network="testnet"}') == 253
    assert query(host, 'up{job="pybridge-agent"}') == 1


def _in_force(world: NodeWorld) -> tuple[int, int]:
    """(rules, set and map elements) of the netpol tables, as nft lists them."""
    assert world.host is not None
    listed = json.loads(world.host.exec("nft", "-j", "list", "ruleset").stdout)["nftables"]
    ours = [item for item in listed if next(iter(item.values())).get("table") == TABLE]
    rules = sum("rule" in item for item in ours)
    elements = sum(len(item[k].get("elem", [])) for item in ours for k in ("set", "map") if k in item)
    return rules, elements


def test_prometheus_scrapes_the_node_agents_policy_metrics(tmp_path: Path, launchers: Path) -> None:
    with contextlib.ExitStack() as stack:
        world = stack.enter_context(node_world(tmp_path / "node", launchers))
        assert world.host is not None
        stack.enter_context(running_prometheus(world.host, tmp_path, "pybridge-node", NODE_METRICS_PORT))
        world.put("networkpolicies", ns_policy("x", "deny", {"podSelector": POD_A}))
        world.start()
        world.wait_logged("netpol-applied")
        host = world.host
        job = '{job="pybridge-node"}'
        assert wait_for(host, f"pybridge_policy_applies_total{job}", 1) == 1
        assert query(host, f"pybridge_policy_apply_failures_total{job}") == 0
        assert query(host, f"pybridge_policy_implementation_delay_seconds_count{job}") == 4  # four lists
        rules, elements = _in_force(world)
        assert rules > 0 and elements > 0
        assert query(host, f"pybridge_policy_rules{job}") == rules
        assert query(host, f"pybridge_policy_set_elements{job}") == elements
        assert query(host, 'pybridge_policy_refused{job="pybridge-node",reason="invalid"}') == 0
        # A policy the API server would refuse: named in the log with its field, counted, its
        # pods isolated (never allowed all); the policy before still applies.
        world.put("networkpolicies", ns_policy("y", "bad", {"podSelector": POD_A, "ingress": [
            {"ports": [{"port": 70000}]}]}))
        assert wait_for(host, f"pybridge_policy_applies_total{job}", 2) == 2
        assert wait_for(host, 'pybridge_policy_refused{job="pybridge-node",reason="invalid"}', 1) == 1
        fields = 'pybridge_netpol_refused_fields_total{job="pybridge-node",kind="NetworkPolicy"}'
        assert query(host, fields) == 1
        # the second event's delay too
        assert query(host, f"pybridge_policy_implementation_delay_seconds_count{job}") == 5
        assert [(e["object"], e["field"]) for e in world.logged("netpol-refused")] == \
            [("y/bad", "spec.ingress.0.ports.0.port")]
        rules, elements = _in_force(world)
        assert query(host, f"pybridge_policy_rules{job}") == rules
        assert query(host, f"pybridge_policy_set_elements{job}") == elements
        assert not reached(world, "z/a", "y/a") and not reached(world, "z/a", "x/a")
        assert reached(world, "x/a", "z/a")
        assert world.stop()[0] == 0
