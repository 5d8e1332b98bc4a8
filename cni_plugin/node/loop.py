"""The node controller's long-lived loops, shared by the Node and the NetworkPolicy side: streams of
API events pumped into a queue, and a consumer that retries a failed step after a backoff.

No error ends a loop: a stream that fails starts over, a step that fails (nft refused or hung,
a route refused, a bug) is run again after an exponential backoff with jitter, events or not.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

Event = tuple[str, str, Any]  # (kind, event type or "SYNC", payload)
Stream = Callable[[str], Iterator[tuple[str, Any]]]
Log = Callable[..., None]


class Backoff:
    """Exponential delays with jitter: `first` doubling up to `cap`, each drawn from [d/2, d]
    (a fleet of agents does not retry in step); reset() after a success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.first, self.cap, self.rand = first, cap, rand
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay * (0.5 + self.rand() / 2)

    def reset(self) -> None:
        self.failures = 0


def pump(kind: str, stream: Stream, events: queue.Queue[Event], log: Log,
         stop: threading.Event, errors: tuple[type[BaseException], ...]) -> None:
    """One kind's events into the queue, starting over (after a backoff) when the stream fails."""
    delays = Backoff()
    while not stop.is_set():
        try:
            for event, payload in stream(kind):
                events.put((kind, event, payload))
                delays.reset()
                if stop.is_set():
                    return
        except errors as exc:
            log("retry", kind=kind, error=str(exc)[:300])
            stop.wait(delays.next())


def _batch(events: queue.Queue[Event], wait: float) -> list[Event]:
    """The next event (waiting up to `wait` s) and every one already queued behind it."""
    try:
        batch = [events.get(timeout=wait)]
    except queue.Empty:
        return []
    while True:
        try:
            batch.append(events.get_nowait())
        except queue.Empty:
            return batch


def drive(step: Callable[[list[Event]], bool], events: queue.Queue[Event], stop: threading.Event,
          log: Log, clock: Callable[[], float] = time.monotonic) -> None:
    """Until `stop`: step(every event queued) whenever one comes; step returns True when it
    failed, and is then called again (with no events) after a backoff unless events come first."""
    delays = Backoff(first=1.0, cap=60.0)
    retry_at: float | None = None
    while not stop.is_set():
        batch = _batch(events, 0.5 if retry_at is None else min(0.5, max(0.0, retry_at - clock())))
        if not batch and (retry_at is None or clock() < retry_at):
            continue
        try:
            failed = step(batch)
        except Exception as exc:  # a bug must not end the loop: retried like a failure
            log("error", error=f"{type(exc).__name__}: {exc}"[:500])
            failed = True
        if failed:
            retry_at = clock() + delays.next()
        else:
            delays.reset()
            retry_at = None
