"""Calls take turns: at most `at_once` run, a waiting call lends its turn, no wait is unbounded."""

from __future__ import annotations

import threading
import time

from cnikit import turns
from cnikit.turns import Turns

LONG = 10.0  # a bound no passing test comes near: the events below decide, not the clock


def _free_slots(gate: Turns) -> int:
    taken = 0
    while gate._slots.acquire(blocking=False):
        taken += 1
    for _ in range(taken):
        gate._slots.release()
    return taken


def test_no_more_than_at_once_calls_run_at_once() -> None:
    gate = Turns(2, LONG)
    running, most, lock = 0, 0, threading.Lock()

    def call() -> None:
        nonlocal running, most
        with gate.turn() as held:
            assert held
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.02)
            with lock:
                running -= 1

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    assert 1 <= most <= 2
    assert _free_slots(gate) == 2


def test_a_waiting_call_lends_its_turn_and_gets_one_back() -> None:
    gate = Turns(1, LONG)
    waiting, release, other_done, back = threading.Event(), threading.Event(), threading.Event(), []

    def slow() -> None:
        with gate.turn():
            with turns.waiting():
                waiting.set()
                release.wait(LONG)
            back.append(gate._slots.acquire(blocking=False))  # False: the turn is its own again

    def other() -> None:
        with gate.turn() as held:
            assert held
        other_done.set()

    first = threading.Thread(target=slow)
    first.start()
    assert waiting.wait(LONG)
    second = threading.Thread(target=other)
    second.start()
    assert other_done.wait(LONG), "the only turn stayed with a call that was waiting"
    release.set()
    first.join(LONG)
    second.join(LONG)
    assert back == [False]
    assert _free_slots(gate) == 1


def test_past_its_patience_a_call_runs_without_a_turn_and_frees_none() -> None:
    gate = Turns(1, 0.05)
    holding, release, got = threading.Event(), threading.Event(), []

    def holder() -> None:
        with gate.turn():
            holding.set()
            release.wait(LONG)

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(LONG)
    with gate.turn() as held:
        got.append(held)
        with turns.waiting():  # without a turn there is none to lend
            assert _free_slots(gate) == 0
    assert got == [False]
    assert _free_slots(gate) == 0  # the holder's turn is still the holder's
    release.set()
    thread.join(LONG)
    assert _free_slots(gate) == 1


def test_a_failing_call_gives_its_turn_back() -> None:
    gate = Turns(1, LONG)
    try:
        with gate.turn():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert _free_slots(gate) == 1

