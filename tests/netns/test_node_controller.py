"""The node controller process across a restart (issue 29): SIGTERM or SIGINT ends it with 0 within
5 s and leaves the policy rules in force; the next one takes the table over without a moment in
which a forbidden packet gets through (a prober floods a forbidden pair across the restart)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netpol_cases import POD_A, ns_policy
from .nodecontroller import Flood, NodeWorld, node_world, reached

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


@pytest.fixture
def world(tmp_path: Path, launchers: Path) -> Iterator[NodeWorld]:
    with node_world(tmp_path, launchers) as w:
        yield w


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_node_agent_with_0_and_leaves_the_rules(world: NodeWorld, signum: int) -> None:
    world.put("networkpolicies", ns_policy("x", "deny", {"podSelector": POD_A}))
    world.start()
    world.wait_logged("netpol-applied")
    table = world.table()
    assert 'comment "x/deny"' in table  # the policy's chain
    code, seconds = world.stop(signum)
    assert code == 0, world.log()
    assert seconds < 5, f"exited {seconds:.1f} s after the signal"
    assert world.logged("stopped")
    assert world.table() == table
    assert not reached(world, "y/a", "x/a")
    assert reached(world, "x/a", "y/a")  # the rules judge, they do not cut everything


def test_a_restart_lets_no_forbidden_packet_through(world: NodeWorld) -> None:
    world.put("networkpolicies", ns_policy("x", "deny", {"podSelector": POD_A}))
    with Flood(world, "x/a", "y/a") as allowed:  # the prober works
        world.start()
        world.wait_logged("netpol-applied")
    assert allowed.answered > 0
    with Flood(world, "y/a", "x/a") as forbidden:
        assert world.stop(signal.SIGTERM)[0] == 0, world.log()
        world.start()
        world.wait_logged("netpol-applied")  # the new agent replaced the table
    assert forbidden.sent > 1000
    assert forbidden.answered == 0
    assert world.stop(signal.SIGTERM)[0] == 0, world.log()
