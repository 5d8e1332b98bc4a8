"""Fixtures for the reliability tier: throw-away host netns (as tests/netns), a stress switch,
and a figures report printed at the end of the run (and appended to $PYBRIDGE_FIGURES)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.install import install
from testbed.harness import Host, new_netns

STRESS = os.environ.get("PYBRIDGE_STRESS") == "1"
_FIGURES: list[dict[str, Any]] = []


def scale(short: int, stress: int) -> int:
    """The CI size of a loop, or its `make stress` size."""
    return stress if STRESS else short


def record(test: str, **figures: Any) -> None:
    """Keep one test's measured figures for the end-of-run report."""
    _FIGURES.append({"test": test, "stress": STRESS, **figures})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="reliability tests need root")
    for item in items:
        if "tests/reliability" in str(item.fspath):
            item.add_marker(pytest.mark.reliability)
            if os.geteuid() != 0:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for entry in _FIGURES:
        terminalreporter.write_line(json.dumps(entry, sort_keys=True))
    target = os.environ.get("PYBRIDGE_FIGURES")
    if target:
        machine = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "kernel": platform.release(),
                   "python": platform.python_version(), "cpus": os.cpu_count()}
        with open(target, "a") as f:
            f.write(json.dumps({"machine": machine, "figures": _FIGURES}, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def launchers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Installed as `make install` does (the compiled client, Python launchers behind it)."""
    root = tmp_path_factory.mktemp("install")
    install(str(root / "bin"), str(root / "libexec"))
    return root / "bin"


HostFactory = Callable[..., Host]


@pytest.fixture
def make_host(tmp_path: Path, launchers: Path) -> Iterator[HostFactory]:
    """make_host(agent=True|False): a throw-away host netns, with a resident agent if asked."""
    made: list[tuple[Host, Path | None]] = []

    def make(agent: bool = False, tag: str = "h") -> Host:
        base = tmp_path / f"{tag}{len(made)}"
        h = Host(name=new_netns("host"), data_dir=base / "ipam", bin_dir=launchers,
                 agent_socket=base / "agent" / "agent.sock")
        log = base / "agent.log" if agent else None
        made.append((h, log))
        base.mkdir(parents=True, exist_ok=True)
        h.exec("ip", "link", "set", "lo", "up")
        if log is not None:
            h.start_agent(log)
        return h

    try:
        yield make
        for h, log in made:
            if log is not None and h.agent is not None:
                assert h.stop_agent() == 0, log.read_text()
            if log is not None:
                assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        for h, _ in made:
            h.destroy()
