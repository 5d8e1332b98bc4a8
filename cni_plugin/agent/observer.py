"""What the agent tells whoever watches it (the metrics, when enabled): a narrow, stdlib-only seam,
so the agent's serving code never imports prometheus_client and metrics `off` costs nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

from cnikit.spec.errors import INTERNAL


class Observer(Protocol):
    def call_started(self) -> None: ...
    def call_finished(self, program: str, verb: str, code: int, seconds: float) -> None: ...
    def declined(self) -> None: ...
    def add_undone(self) -> None: ...
    def ran_without_turn(self) -> None: ...
    def ipam_released(self, network: str, count: int) -> None:
        """A pyipam GC served here released `count` addresses of `network`."""


class Endpoint(Protocol):
    """Where the agent's health is served: ready once the agent listens, closed when it stops."""

    def ready_when(self, listening: Callable[[], bool]) -> None: ...
    def close(self) -> None: ...


class Silent:
    """The observer when metrics are off."""

    def call_started(self) -> None:
        pass

    def call_finished(self, program: str, verb: str, code: int, seconds: float) -> None:
        pass

    def declined(self) -> None:
        pass

    def add_undone(self) -> None:
        pass

    def ran_without_turn(self) -> None:
        pass

    def ipam_released(self, network: str, count: int) -> None:
        pass


def result_code(exit_code: int, stdout: str) -> int:
    """The CNI error code of a finished call: 0 on success, else the `code` of its error JSON."""
    if exit_code == 0:
        return 0
    try:
        code = json.loads(stdout).get("code")
    except (ValueError, AttributeError):
        return INTERNAL
    return code if type(code) is int else INTERNAL
