"""Calls of a resident agent take turns: a few run at once, the others wait for a turn.

Python runs one thread at a time, and a thread gives the GIL up at every syscall: with dozens of
calls running at once, much of the agent's CPU goes to handing the GIL from thread to thread.
Two at a time keep both CPUs of a small node busy: one call runs Python while the other is in the
kernel (docs/performance.md).

A call that waits for something other than this process (a sleep between polls, an exec'd
program, a lock another process holds) gives its turn up meanwhile, through `waiting()`, so a
slow call never holds the others back. A wait for a lock another call of this process holds
keeps its turn: that call is running, and the lock is handed over at once. Every wait for a turn
is bounded: past `patience` a call runs anyway. Outside a turn (one-shot processes, the agent's
other threads) `waiting()` does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_held = threading.local()  # .turns: the Turns whose turn this thread holds, if any


class Turns:
    def __init__(self, at_once: int, patience: float) -> None:
        self._slots = threading.Semaphore(at_once)
        self._patience = patience

    def _take(self) -> bool:
        held = self._slots.acquire(timeout=self._patience)
        _held.turns = self if held else None
        return held

    def _give_up(self) -> None:
        if getattr(_held, "turns", None) is self:
            _held.turns = None
            self._slots.release()

    @contextlib.contextmanager
    def turn(self) -> Iterator[bool]:
        """Run the body in a turn of its own, or without one after `patience`: yields which."""
        held = self._take()
        try:
            yield held
        finally:
            self._give_up()


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Around a wait: the calling thread's turn goes to another call until the wait is over."""
    turns = getattr(_held, "turns", None)
    if turns is None:
        yield
        return
    turns._give_up()
    try:
        yield
    finally:
        turns._take()
