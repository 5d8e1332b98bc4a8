"""Slow teardown finished after the reply, at a quiet moment, many links at once.

The kernel takes ~15-25 ms to delete a veth: with rtnl_lock held it waits for RCU grace periods
(one per batch of links, not per link), and every ADD of the node waits for that lock. The
reference plugin makes the runtime wait for it, one link per DEL. In the agent, DEL takes the
pod end out of service (down and renamed, so the bridge port has no carrier and CNI_IFNAME is
free at once), marks the host end for removal, releases the address and the rules, and answers;
the work it submits here does the deletion itself.

The work runs on the one thread here, and not while calls are being served: it waits until no
call has run for `quiet` seconds, or until the oldest work has waited `patience` seconds, then
runs everything queued back to back. Work submitted again before it ran runs once (one sweep of
the marked links deletes them all in one kernel batch: cni_plugin/link.py). One thread is
enough: the kernel deletes links under one lock anyway. The agent hurries these along and
drains them before it exits; should it die first, the next agent sweeps the marked links, and
the runtime's removal of the netns deletes the pair with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import log

# A call ends and the next one often begins within a millisecond or two in a burst: wait for a
# gap longer than that, but far shorter than the 10-20 ms a deletion holds the kernel's lock.
QUIET = 0.03
PATIENCE = 1.0

Work = Callable[[], None]


class Removals:
    def __init__(self, quiet: float = QUIET, patience: float = PATIENCE) -> None:
        self._quiet, self._patience = quiet, patience
        self._lock = threading.Condition()
        self._queued: list[Work] = []
        self._oldest = 0.0  # when the oldest queued work was submitted
        self._running = 0  # work taken off the queue, not yet done
        self._calls = 0  # calls being served now
        self._last_call = float("-inf")  # when the last one ended
        self._hurry = False
        self._thread: threading.Thread | None = None

    def submit(self, work: Work) -> None:
        with self._lock:
            if not self._queued:
                self._oldest = time.monotonic()
            self._queued.append(work)
            if self._thread is None:  # started at the first DEL, then kept
                self._thread = threading.Thread(target=self._run, name="removal", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def call_started(self) -> None:
        with self._lock:
            self._calls += 1

    def call_finished(self) -> None:
        with self._lock:
            self._calls -= 1
            self._last_call = time.monotonic()
            self._lock.notify_all()

    def _wait(self) -> float | None:
        """Seconds until the queued work may run (0: now), None while nothing is queued."""
        if not self._queued:
            return None
        now = time.monotonic()
        due = self._oldest + self._patience - now
        if self._hurry or due <= 0:
            return 0.0
        if self._calls:
            return due
        return max(min(self._last_call + self._quiet - now, due), 0.0)

    def _take(self) -> list[Work]:
        with self._lock:
            while (wait := self._wait()) != 0.0:
                self._lock.wait(wait)
            batch, self._queued = list(dict.fromkeys(self._queued)), []
            self._running = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            for work in batch:
                try:
                    work()
                except Exception as exc:
                    log.process().warning("removal_failed", error=str(exc))
                finally:
                    with self._lock:
                        self._running -= 1
                        self._lock.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Run what is queued now, calls or not, and wait for it; False if some was still
        queued or running at the timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._hurry = True
            self._lock.notify_all()
            try:
                while self._queued or self._running:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._lock.wait(remaining)
                return True
            finally:
                self._hurry = False
