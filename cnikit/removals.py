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
from collections.abc import Callable

from . import log
from .inflight import InFlight


class Removals:
    def __init__(self) -> None:
        self._pending = InFlight()
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, work: Callable[[], None]) -> None:
        self._pending.started()
        with self._start_lock:
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
                self._pending.finished()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait for the removals under way; False if some were still running at the timeout."""
        return self._pending.drain(timeout)
