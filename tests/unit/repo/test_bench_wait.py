"""bench/run.py waits for the kernel to free the netns a run deleted before it times CRI."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[3]


def bench_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_kernel(
    monkeypatch: pytest.MonkeyPatch, counts: list[int | None]
) -> tuple[ModuleType, list[int | None]]:
    """bench/run.py on a fake clock, reading the kernel's netns count from `counts` (the last
    one repeats)."""
    run = bench_run()
    now = [0.0]
    monkeypatch.setattr(run, "time", SimpleNamespace(
        monotonic=lambda: now[0], sleep=lambda seconds: now.__setitem__(0, now[0] + seconds)))
    read: list[int | None] = []

    def count() -> int | None:
        read.append(counts[min(len(read), len(counts) - 1)])
        return read[-1]

    monkeypatch.setattr(run, "netns_in_kernel", count)
    return run, read


def test_waits_until_the_count_stops_falling(monkeypatch: pytest.MonkeyPatch) -> None:
    run, read = fake_kernel(monkeypatch, [1000, 1000, 700, 700, 700, 300, 42])
    waited = run.wait_for_netns_cleanup()
    assert 42 in read and read[-1] == 42
    assert waited >= 1.0 + 0.2 * 6  # six reads up to the last fall, then a steady second


def test_gives_up_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = fake_kernel(monkeypatch, [1000 - i for i in range(10_000)])
    assert 5.0 <= run.wait_for_netns_cleanup(timeout=5.0) < 5.5


def test_returns_at_once_where_the_kernel_does_not_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    run, read = fake_kernel(monkeypatch, [None])
    assert run.wait_for_netns_cleanup() == 0.0 and read == [None]
