"""Slow teardown finished after the reply: the agent's DEL answers once the pod is out of service.

The kernel takes ~15-25 ms to delete a veth (it waits for RCU grace periods); the reference
plugin makes the runtime wait for that. In the agent, DEL takes the pod end down and renames it
(so CNI_IFNAME is free for a new ADD at once, and the bridge port has no carrier), releases the
address and the rules, answers, and leaves the deletion itself to the one thread here. One
thread is enough: the kernel deletes links one at a time under its rtnl lock anyway, and a
thread started per DEL cost the serving thread up to milliseconds in a burst. The agent drains
these before it exits; should it die first, the runtime's removal of the netns deletes the pair
with it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from . import log


class Removals:
    def __init__(self) -> None:
        self._pending = 0
        self._idle = threading.Condition()
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, work: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
            if self._thread is None:  # started at the first DEL, then kept
                self._thread = threading.Thread(target=self._run, name="removal", daemon=True)
                self._thread.start()
        self._work.put(work)

    def _run(self) -> None:
        while True:
            work = self._work.get()
            try:
                work()
            except Exception as exc:
                log.process().warning("removal_failed", error=str(exc))
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait for the removals under way; False if some were still running at the timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True
