"""netns.run_in's reused workers: the caller never moves, no worker idles inside the netns it
worked in, and a worker that cannot go back is not used again."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from cni_plugin import netns
from testbed.harness import delete_netns, new_netns

pytestmark = pytest.mark.netns


@pytest.fixture
def pod() -> Iterator[int]:
    name = new_netns("workers")
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)
        delete_netns(name)


def _inode(path: str) -> int:
    return os.stat(path).st_ino


def _threads_in(fd: int) -> list[str]:
    target = os.fstat(fd).st_ino
    return [tid for tid in os.listdir("/proc/self/task") if _inode(f"/proc/self/task/{tid}/ns/net") == target]


def test_work_runs_inside_and_nobody_stays_there(pod: int) -> None:
    home = _inode("/proc/thread-self/ns/net")
    for _ in range(3):
        assert netns.run_in(pod, lambda: _inode("/proc/thread-self/ns/net")) == os.fstat(pod).st_ino
        assert _inode("/proc/thread-self/ns/net") == home
        assert _threads_in(pod) == []  # an idle worker would keep a deleted pod netns alive


def test_errors_reach_the_caller_and_the_worker_is_reused(pod: int) -> None:
    def fail() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        netns.run_in(pod, fail)
    before = threading.active_count()
    assert netns.run_in(pod, lambda: 42) == 42
    assert threading.active_count() == before


def test_a_worker_that_cannot_go_back_ends(pod: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_idle", [])
    monkeypatch.setattr(netns, "_go_home", lambda home: False)
    seen: list[threading.Thread] = []
    assert netns.run_in(pod, lambda: seen.append(threading.current_thread())) is None
    assert netns._idle == []
    seen[0].join(5)
    assert not seen[0].is_alive()


def test_parallel_callers_get_their_own_workers(pod: int) -> None:
    inside = threading.Barrier(4, timeout=10)

    def call() -> None:
        assert netns.run_in(pod, lambda: inside.wait() is not None)

    callers = [threading.Thread(target=call) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(20)
    assert not inside.broken
    assert len(netns._idle) <= netns.MAX_IDLE_WORKERS
