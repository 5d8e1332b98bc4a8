"""Fixtures for the interop tier: throw-away host netns (tests/netns/harness.py), the Go tools."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns import conftest as netns_conftest
from tests.netns.harness import Host, new_netns

from .drive import GoTools, Libcni, build, missing_toolchain

# .ci/run sets this: on CI a missing Go toolchain is a failure, not a skip.
REQUIRE = os.environ.get("PYBRIDGE_REQUIRE_INTEROP") == "1"

# pybridge and pyipam installed the way `make install` does it, shared with tests/netns.
launchers = netns_conftest.launchers


@pytest.fixture(scope="session")
def go_tools(tmp_path_factory: pytest.TempPathFactory) -> GoTools:
    reason = missing_toolchain()
    if reason:
        if REQUIRE:
            pytest.fail(f"PYBRIDGE_REQUIRE_INTEROP=1 but {reason}")
        pytest.skip(reason)
    return build(tmp_path_factory.mktemp("go"))


@pytest.fixture
def make_host(tmp_path: Path, launchers: Path) -> Iterator[Callable[[str], Host]]:
    """Host netns factory (several per test for side-by-side runs); all destroyed afterwards."""
    made: list[Host] = []

    def make(tag: str = "host") -> Host:
        # No agent listens at agent_socket: the launchers serve each call in-process.
        host = Host(name=new_netns(tag), data_dir=tmp_path / tag / "ipam", bin_dir=launchers,
                    agent_socket=tmp_path / f"{tag}-agent.sock")
        made.append(host)
        host.exec("ip", "link", "set", "lo", "up")
        return host

    try:
        yield make
    finally:
        for host in made:
            host.destroy()


@pytest.fixture
def host(make_host: Callable[[str], Host]) -> Host:
    return make_host("host")


@pytest.fixture
def make_libcni(go_tools: GoTools, tmp_path: Path) -> Callable[[Host], Libcni]:
    """A libcni driver for a host, with conf and cache dirs of its own under the test's tmp dir."""

    def make(host: Host) -> Libcni:
        return Libcni(host=host, binary=go_tools.cnidrive, conf_dir=tmp_path / host.name / "net.d",
                      cache_dir=tmp_path / host.name / "cache")

    return make


@pytest.fixture
def libcni(host: Host, make_libcni: Callable[[Host], Libcni]) -> Libcni:
    return make_libcni(host)
