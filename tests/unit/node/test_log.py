"""Lines of the node controller's log stay whole when its threads log at once."""

from __future__ import annotations

import json
import threading

import pytest

from cni_plugin.node import controller


def test_log_lines_from_several_threads_stay_whole(capfd: pytest.CaptureFixture[str]) -> None:
    def burst(n: int) -> None:
        for i in range(500):
            controller._log("netpol-retry", thread=n, i=i)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capfd.readouterr().err.splitlines()
    assert sorted((e["thread"], e["i"]) for e in map(json.loads, lines)) == [
        (n, i) for n in range(8) for i in range(500)
    ]
