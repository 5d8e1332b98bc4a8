"""Slow teardown finished after the reply, many links in one kernel batch.

The kernel takes ~15-25 ms to delete a veth: with rtnl_lock held it waits for RCU grace periods
(one set per batch of links, not per link), and every ADD of the node waits for that lock. The
reference plugin makes the runtime wait for it, one link per DEL. In the agent, DEL takes the
pod end out of service (down and renamed, so the bridge port has no carrier and CNI_IFNAME is
free at once), marks the host end for removal, releases the address and the masquerade rules,
and answers; the work it submits here does the deletion itself, and the source check's
teardown (cni_plugin/sourcecheck.py: one nf_tables batch for all queued, whose commit waits for
the kernel as a veth's deletion does).

The work runs on the one thread here, everything queued at once, back to back: DELs that come
while a batch runs go in the next one, and work submitted again before it ran runs once (one
sweep of the marked links deletes them all in one request: cni_plugin/link.py). Waiting for a
quiet moment instead was measured worse (bench/results.md): it moved the kernel's batch into the
ADDs that follow a burst of DELs. The agent drains these before it exits; should it die first,
the next agent sweeps the marked links, and the runtime's removal of the netns deletes the pair
with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import log

Work = Callable[[], None]


class Removals:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queued: list[Work] = []
        self._running = 0  # work taken off the queue, not yet done
        self._thread: threading.Thread | None = None

    def submit(self, work: Work) -> None:
        with self._lock:
            self._queued.append(work)
            if self._thread is None:  # started at the first DEL, then kept
                self._thread = threading.Thread(target=self._run, name="removal", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def _take(self) -> list[Work]:
        with self._lock:
            while not self._queued:
                self._lock.wait()
            batch, self._queued = list(dict.fromkeys(self._queued)), []
            self._running = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            for work in self._take():
                try:
                    work()
                except Exception as exc:
                    log.process().warning("removal_failed", error=str(exc))
                finally:
                    with self._lock:
                        self._running -= 1
                        self._lock.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait for the removals queued and under way; False if some were left at the timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queued or self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True
