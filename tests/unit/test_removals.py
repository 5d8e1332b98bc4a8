"""The agent's deferred removals: one thread, in order, past failures, at a quiet moment (or at
the latest after `patience`), work submitted twice run once, hurried and drained on demand."""

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


def test_removals_wait_while_a_call_is_served_and_run_once_it_ends() -> None:
    removals = Removals(quiet=0.01, patience=60)
    ran = threading.Event()
    removals.call_started()
    removals.submit(ran.set)
    assert not ran.wait(0.3)  # a call in flight: the removal waits
    removals.call_finished()
    assert ran.wait(5)


def test_removals_run_after_patience_even_if_calls_never_stop() -> None:
    removals = Removals(quiet=0.01, patience=0.2)
    ran = threading.Event()
    removals.call_started()  # never finished
    removals.submit(ran.set)
    assert ran.wait(5)


def test_work_submitted_again_before_it_ran_runs_once() -> None:
    removals = Removals(quiet=0.01, patience=60)
    runs: list[str] = []

    def sweep() -> None:
        runs.append("sweep")

    removals.call_started()
    for _ in range(3):
        removals.submit(sweep)
    removals.submit(lambda: runs.append("other"))
    removals.call_finished()
    assert removals.drain(timeout=5)
    assert runs == ["sweep", "other"]
    removals.submit(sweep)  # a new DEL after the batch: a new sweep
    assert removals.drain(timeout=5)
    assert runs == ["sweep", "other", "sweep"]


def test_drain_runs_queued_work_at_once_despite_calls() -> None:
    removals = Removals(quiet=60, patience=60)
    ran = threading.Event()
    removals.call_started()
    removals.submit(ran.set)
    assert not ran.wait(0.2)
    assert removals.drain(timeout=5)  # the agent stops: no waiting for a quiet moment
    assert ran.is_set()
