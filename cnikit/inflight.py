"""A count of work under way that can be waited for until it drops to zero, with a deadline:
the agent's calls and its deferred removals are drained this way before it exits."""

from __future__ import annotations

import threading
import time


class InFlight:
    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def started(self) -> None:
        with self._idle:
            self._count += 1

    def finished(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is under way; False if something still was at the timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True
