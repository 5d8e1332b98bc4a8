"""Fuzzing the exec entry (env + stdin through skel.run) and the agent protocol (raw frames to a
live agent), with hypothesis; atheris (coverage-guided) in `make stress` when it is installed.

The worker runs inside a throw-away host netns with a private mount namespace; the sums must
show 0 tracebacks, 0 hangs and no failure without a spec error object.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.harness import Host, sh

from .conftest import STRESS, HostFactory, record, scale

ROOT = Path(__file__).resolve().parents[2]
BAD = ("tracebacks", "hangs", "failures_without_error_json", "bad_result_json", "agent_thread_exceptions",
       "accepted_without_response")


def _worker(host: Host, tmp_path: Path, mode: str, count: int, timeout: float) -> Any:
    pod = host.new_pod()
    sandbox = tmp_path / f"sandbox-{mode}"
    sandbox.mkdir()
    # /var/lib under a tmpfs in the worker's own mount namespace: a config without dataDir
    # lands in /var/lib/cni/networks, which must not be the machine's.
    script = f'mount -t tmpfs tmpfs /var/lib && exec "$0" -m tests.reliability.fuzz {mode} {count} "$1" "$2"'
    proc = sh("ip", "netns", "exec", host.name, "sh", "-c", script, sys.executable, str(sandbox),
              f"/run/netns/{pod}", timeout=timeout, check=False)
    return proc


@pytest.mark.parametrize("mode", ["exec", "agent"])
def test_fuzz_gives_only_spec_errors(make_host: HostFactory, tmp_path: Path, mode: str) -> None:
    host = make_host()
    count = scale(1500, 100_000) if mode == "exec" else scale(300, 20_000)
    proc = _worker(host, tmp_path, mode, count, timeout=scale(600, 7200))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    figures = json.loads(proc.stdout.splitlines()[-1])
    record(f"fuzz[{mode}]", **{k: v for k, v in figures.items() if k != "examples"})
    assert not any(figures.get(key) for key in BAD), figures["examples"]
    if mode == "agent":
        assert figures["still_serving"]


@pytest.mark.skipif(not STRESS or importlib.util.find_spec("atheris") is None,
                    reason="atheris runs in `make stress` only, when installed")
def test_atheris_coverage_guided_exec_entry(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host()
    runs = 50_000
    proc = _worker(host, tmp_path, "atheris", runs, timeout=7200)
    tail = proc.stderr.decode(errors="replace")[-3000:]
    assert proc.returncode == 0, tail
    done = re.search(r"Done (\d+) runs", tail)
    record("fuzz[atheris]", runs=int(done.group(1)) if done else None, crashes=0)
