"""The agent's deferred removals: one thread, in order, past failures, what is queued taken as
one batch (work submitted again before it ran runs once), drained on demand."""

from __future__ import annotations

import threading

from cnikit.removals import Removals


def test_removals_run_in_order_on_one_thread_past_a_failure() -> None:
    removals = Removals()
    done: list[tuple[int, str]] = []
    release = threading.Event()

    def step(i: int) -> None:
        release.wait(5)
        if i == 1:
            raise OSError("the link is gone already")
        done.append((i, threading.current_thread().name))

    before = threading.active_count()
    for i in range(5):
        removals.submit(lambda i=i: step(i))
    assert threading.active_count() == before + 1  # one thread, not one per removal
    assert not removals.drain(timeout=0.05)  # held up: not drained
    release.set()
    assert removals.drain(timeout=5)
    assert done == [(0, "removal"), (2, "removal"), (3, "removal"), (4, "removal")]


def test_work_submitted_again_before_it_ran_runs_once() -> None:
    removals = Removals()
    runs: list[str] = []
    started, busy = threading.Event(), threading.Event()

    def sweep() -> None:
        runs.append("sweep")

    def hold() -> None:
        started.set()
        busy.wait(5)

    removals.submit(hold)
    assert started.wait(5)  # the thread is busy, its batch taken: what follows queues up
    for _ in range(3):
        removals.submit(sweep)
    removals.submit(lambda: runs.append("other"))
    busy.set()
    assert removals.drain(timeout=5)
    assert runs == ["sweep", "other"]
    removals.submit(sweep)  # a new DEL after the batch: a new sweep
    assert removals.drain(timeout=5)
    assert runs == ["sweep", "other", "sweep"]
