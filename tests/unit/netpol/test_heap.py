"""The node controller moves its long-lived objects out of the garbage collector's way once per
relist (policy_controller.settle_heap), never at an incremental event."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cni_plugin.node.netpol.policy_controller import PolicyController, settle_heap

from .netpol_world import ME, world_pods

DENY = {"metadata": {"name": "deny", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}}


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test run collects as usual


def test_the_heap_is_settled_after_each_relist_is_applied_and_not_at_events() -> None:
    settled: list[int] = []
    applied: list[str] = []
    agent = PolicyController(ME, applied.append, lambda *_a, **_k: None)
    agent.settle = lambda: settled.append(len(applied))
    agent.handle("NetworkPolicy", "SYNC", [DENY])
    agent.handle("Pod", "SYNC", [p.model_dump(by_alias=True, mode="json") for p in world_pods()])
    agent.handle("Namespace", "SYNC", [])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    assert agent.reconcile()
    assert settled == [1]  # after the rules went in
    agent.handle("NetworkPolicy", "DELETED", DENY)
    assert agent.reconcile()
    assert settled == [1]
    agent.handle("NetworkPolicy", "SYNC", [DENY])  # a relist
    assert agent.reconcile()
    assert settled == [1, 3]


def test_settle_heap_freezes_what_is_alive_and_collects_what_was_frozen(unfrozen: None) -> None:
    class Cycle:
        other: object = None

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    settle_heap()
    assert gc.get_freeze_count() > 0
    del a, b
    gc.collect()
    assert gone() is not None  # frozen: out of the collector's way
    settle_heap()  # at the next relist: unfrozen first, so collected
    assert gone() is None
