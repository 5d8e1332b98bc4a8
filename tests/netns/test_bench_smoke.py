"""CI's short run of `make bench`: it must work end to end; its timings are not judged here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import sid

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not os.path.exists("/usr/lib/cni/bridge"), reason="reference plugins not installed")
def test_bench_smoke(tmp_path: Path) -> None:
    raw = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--pods", "20", "--parallel", "4", "--scale", "100",
         "--churn", "4", "--churn-rounds", "2", "--json", str(raw)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| ADD p50 ms |" in proc.stdout and "| DEL p99 ms |" in proc.stdout
    import json

    results = json.loads(raw.read_text())
    assert set(results) >= {"reference", "pybridge+agent", "pybridge in-process"}
    # sid's reference plugins as well, their version in the column's name, unless the archive is
    # unreachable (and nothing cached): then the output says why.
    try:
        version = sid.plugins_version(sid.reference_plugins())
    except sid.Unavailable:
        assert "sid's reference plugins: not measured (" in proc.stdout
    else:
        assert "reference sid" in results
        debian = sid.plugins_version(Path("/usr/lib/cni"))
        assert f"| reference {debian} (Debian 12) | reference {version} (Debian unstable) |" in proc.stdout
    for label, report in results.items():
        assert report["errors"] == [] and report["par_errors"] == 0, label
        assert report["par_distinct_ips"] == 4, label
        assert len(report["add"]) == 20 and len(report["del"]) == 20, label
    # sequential calls and bursts made again, the reference's and the agent's alternating
    assert "| ADD p50 ms, calls alternating with the other variant's |" in proc.stdout
    for label in ("reference", "pybridge+agent"):
        for verb in ("add", "check", "del"):
            assert len(results[label][f"paired_{verb}"]) == 20, (label, verb)
        assert results[label]["paired_par_add_wall"] is not None, label
    # the scale run, then again with IPv6 off in the pods, for the reference and the agent
    assert "| ADD p50 ms, pods 51-100, pods without IPv6 |" in proc.stdout
    # ADDs while other pods are deleted, the reference's and the agent's rounds alternating
    assert "| ADD p50 ms while 4 other pods are deleted (churn), rounds alternating |" in proc.stdout
    for label in ("reference", "pybridge+agent"):
        assert len(results[label]["churn_add"]) == 2 * 8, label
        assert len(results[label]["churn_del_walls"]) == 2, label
    for label in {"reference", "reference sid", "pybridge+agent"} & set(results):
        assert len(results[label]["scale_add"]) == 100 and len(results[label]["scale_add_no6"]) == 100
