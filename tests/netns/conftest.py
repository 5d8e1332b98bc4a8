from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Host, new_netns


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="netns tests need root")
    for item in items:
        if "tests/netns" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(name=new_netns("host"), data_dir=tmp_path / "ipam")
    h.exec("ip", "link", "set", "lo", "up")
    try:
        yield h
    finally:
        h.destroy()
