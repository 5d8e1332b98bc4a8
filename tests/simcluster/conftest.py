"""kind-sim: one three-node cluster per runtime, the DaemonSet deployed on every node.

The nodes run containerd 2.x first (what kind's node images ship, with today's reference
plugins, both from Debian's unstable archive: scripts/sid.py), then Debian 12's 1.6;
the runtime and its version are in each test's id.

`cluster` is the fixture to build on (tests/simcluster/cluster.py says what it offers). The session
ends by checking that the machine is as it was: root netns links and nftables ruleset, mount
table, no process left in a node's mount namespace, no netns of ours.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.node import Runtime, mount_points, wait_for
from testbed.node import missing_tools as containerd_missing

from ..conftest import _root_state
from ..e2e.tier import gate_tier, runtime_params
from . import image
from .cluster import NODE_MOUNTS, Cluster, kind_config, node_names

REQUIRE_ENV = "PYBRIDGE_REQUIRE_KINDSIM"  # set by .ci/run: there a missing buildah is a failure
TIMINGS: dict[str, float] = {}
TIMINGS_FILE = image.REPO / "build" / "kind-sim" / "timings.json"


def _tier_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "kind-sim needs root"
    if missing := containerd_missing() + image.missing_tools():
        return f"kind-sim needs {', '.join(missing)} (apt-get install containerd runc buildah debootstrap)"
    return None


@functools.cache
def runtimes() -> list[Any]:
    return runtime_params(_tier_unavailable(), REQUIRE_ENV, newest_first=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cluster" in metafunc.fixturenames:
        metafunc.parametrize("cluster", runtimes(), indirect=True, scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    gate_tier(items, "tests/simcluster", _tier_unavailable(), REQUIRE_ENV)


@pytest.fixture(scope="session")
def images() -> image.Images:
    started = time.monotonic()
    built = image.build_all(log=lambda line: print("\n" + line))
    TIMINGS["images_s"] = time.monotonic() - started
    return built


def record(path: Path, runtime_id: str, figures: dict[str, Any]) -> None:
    """Store `figures` under the runtime's id in the JSON file `path`, keeping other runtimes'."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict) or not all(key.startswith("containerd-") for key in data):
        data = {}  # the format before per-runtime figures
    data[runtime_id] = dict(figures)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _processes_in(namespaces: set[int]) -> list[int]:
    pids = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if pid_dir.joinpath("ns", "mnt").stat().st_ino in namespaces:
                pids.append(int(pid_dir.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, images: image.Images) -> Iterator[Cluster]:
    """Session-scoped per runtime: one runtime's cluster is torn down before the next is made."""
    runtime = request.param
    if not isinstance(runtime, Runtime):  # 2.x unavailable where it is required
        pytest.fail(str(runtime), pytrace=False)
    before_state, before_mounts = _root_state(), mount_points()
    c = Cluster(images, Path(tempfile.mkdtemp(prefix="pbt-ks-")), runtime)
    try:
        started = time.monotonic()
        c.up()
        c.add_nodes(node_names(kind_config()))
        TIMINGS["nodes_up_s"] = time.monotonic() - started
        started = time.monotonic()
        for name in c.nodes:
            c.deploy(name)
        c.wait_ready()
        TIMINGS["daemonset_to_ready_s"] = time.monotonic() - started
        print(f"\nkind-sim on {runtime.id}: {TIMINGS}")
        record(TIMINGS_FILE, runtime.id, TIMINGS)
        yield c
    finally:
        try:
            c.down()
        finally:  # the node trees go unless something is still mounted there (the check below)
            if not any(m.startswith(str(c.root)) for m in mount_points()):
                shutil.rmtree(c.root, ignore_errors=True)
        # teardown SIGKILLs what is left there; under load the last ones take a moment to go
        wait_for(lambda: not _processes_in(c.mount_namespaces), 10, "no process left in the nodes' mount ns")
        # other helpers' tiers make and drop netns pins meanwhile: judge the paths kind-sim uses
        ours = {
            m
            for m in mount_points() ^ before_mounts
            if m.startswith(str(c.root))
            or (any(m == t or m.startswith(t + "/") for t in NODE_MOUNTS) and not m.startswith("/run/netns/"))
        }
        assert not ours, f"mounts left behind: {ours}"
        after = _root_state()
        assert after[0] == before_state[0], f"root netns links changed: {after[0] ^ before_state[0]}"
        assert after[1] == before_state[1], "root netns nftables ruleset changed"
