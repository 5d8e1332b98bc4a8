"""The containerd tier: one private containerd node per session, pods removed after each test."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .node import Node, Pods, gate_tier, missing_tools

REQUIRE_ENV = "PYBRIDGE_REQUIRE_E2E"  # set by .ci/run: there a missing containerd is a failure


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "the containerd tier needs root"
    elif missing := missing_tools():
        reason = f"the containerd tier needs {', '.join(missing)} (apt-get install containerd runc)"
    gate_tier(items, "tests/e2e", reason, REQUIRE_ENV)


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
def node() -> Iterator[Node]:
    started = time.monotonic()
    n = Node(root=Path(tempfile.mkdtemp(prefix="pbt-e2e-")))
    try:
        n.setup()
        print(f"\ncontainerd node up in {time.monotonic() - started:.1f}s")
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
