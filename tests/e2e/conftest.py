"""The containerd tier: one private containerd node per runtime, pods removed after each test.

Every scenario runs on Debian 12's containerd 1.6 and on containerd 2.x unpacked from Debian's
unstable archive (containerd2.py); the runtime and its version are in each test's id, e.g.
`test_pod_ip_is_the_address_pybridge_assigned[containerd-2.1.9]`.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.node import Node, Pods, Runtime, missing_tools

from .tier import gate_tier, runtime_params

REQUIRE_ENV = "PYBRIDGE_REQUIRE_E2E"  # set by .ci/run: there a missing containerd is a failure
SUMMARY: list[str] = []  # set-up times, printed at the end of the run


def _tier_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the containerd tier needs root"
    if missing := missing_tools():
        return f"the containerd tier needs {', '.join(missing)} (apt-get install containerd runc)"
    return None


@functools.cache
def runtimes() -> list[Any]:
    started = time.monotonic()
    params = runtime_params(_tier_unavailable(), REQUIRE_ENV)
    SUMMARY.append(f"runtimes {[p.id for p in params]} ready in {time.monotonic() - started:.1f}s")
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "node" in metafunc.fixturenames:
        metafunc.parametrize("node", runtimes(), indirect=True, scope="session")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(f"containerd tier: {line}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    gate_tier(items, "tests/e2e", _tier_unavailable(), REQUIRE_ENV)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failed scenario shows what containerd and pybridge said, before teardown removes it."""
    report: pytest.TestReport = yield
    node = getattr(item, "funcargs", {}).get("node")
    if report.failed and report.when != "teardown" and isinstance(node, Node):
        report.sections.append(("containerd.log (last lines)", node.containerd_log()))
        cni_log = node.root / "cni.log"
        if cni_log.exists():
            report.sections.append(("pybridge cni.log (last lines)",
                                    "\n".join(cni_log.read_text().splitlines()[-20:])))
    return report


@pytest.fixture(scope="session")
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """Session-scoped per runtime: pytest runs one runtime's scenarios, tears its node down, then
    sets up the next."""
    runtime = request.param
    if not isinstance(runtime, Runtime):  # 2.x unavailable where it is required
        pytest.fail(str(runtime), pytrace=False)
    started = time.monotonic()
    n = Node(root=Path(tempfile.mkdtemp(prefix="pbt-e2e-")), runtime=runtime)
    try:
        n.setup()
        SUMMARY.append(f"{runtime.id} node up in {time.monotonic() - started:.1f}s")
        yield n
    finally:
        n.teardown()


@pytest.fixture
def pods(node: Node) -> Iterator[Pods]:
    p = Pods(node)
    try:
        yield p
    finally:
        p.remove_all()
