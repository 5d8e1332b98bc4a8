"""The pytest side of the containerd tiers (tests/e2e, tests/simcluster): skipping or failing a tier
that cannot run, and one param per runtime. The node harness itself (node.py) needs no pytest, so
bench/cri.py runs it too."""

from __future__ import annotations

import os
from typing import Any

import pytest

from testbed import containerd2
from testbed.node import debian_runtime, sid_runtime


def gate_tier(items: list[Any], tier: str, reason: str | None, require_env: str) -> None:
    """Skip the tier's tests for `reason`; a failure instead where CI sets `require_env`=1."""
    ours = [item for item in items if tier in str(item.fspath)]
    if reason is None or not ours:
        return
    if os.environ.get(require_env) == "1":
        raise pytest.UsageError(f"{require_env}=1 but {reason}")
    for item in ours:
        item.add_marker(pytest.mark.skip(reason=reason))


def runtime_params(unavailable: str | None, require_env: str, newest_first: bool = False) -> list[Any]:
    """pytest params, one per runtime, id `containerd-<version>`: Debian 12's 1.6 and 2.x. Where
    the tier cannot run at all (`unavailable`), placeholders its gate skips. Without 2.x, its
    param carries the reason: skipped, or failed by the fixture where `require_env`=1."""
    if unavailable:
        return [pytest.param(None, id="containerd-1.6"), pytest.param(None, id="containerd-2")]
    debian = debian_runtime()
    try:
        runtime = sid_runtime()
        two = pytest.param(runtime, id=runtime.id)
    except containerd2.Unavailable as exc:
        reason = f"containerd 2.x from Debian's {containerd2.SUITE}: {exc}"
        marks = [] if os.environ.get(require_env) == "1" else [pytest.mark.skip(reason=reason)]
        two = pytest.param(reason, id="containerd-2-unavailable", marks=marks)
    params = [pytest.param(debian, id=debian.id), two]
    return params[::-1] if newest_first else params
