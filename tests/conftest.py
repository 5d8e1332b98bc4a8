"""Suite-wide guard: the tests must leave the machine's own network exactly as they found it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from testbed.harness import RUN_MARK, TEST_PREFIX

if TYPE_CHECKING:
    from ipam.index import Indexes

# The containerd tiers load grpc into this process; its fork handlers would then restart its
# poller threads in every child forked for a preexec_fn (setns before exec), where closing the
# inherited fds makes the poller abort the child (SIGABRT, "epoll_wait error: Bad file descriptor";
# grpc/grpc#43055).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# An agent a test starts must not collect the machine's own IPAM stores and libcni cache (its
# defaults): tests that want its collector turn it on with their own dirs.
os.environ.setdefault("PYBRIDGE_GC_INTERVAL", "0")
# Tiers that make namespaces, links and rules: without root they are skipped, not failed.
ROOT_ONLY = ("tests/netns/", "tests/interop/")
# What every tier but the unit tier runs (and the guard below reads the root netns with), by the
# Debian package that has it.
TOOLS = {"ip": "iproute2", "nft": "nftables"}


def _missing_tools() -> list[str]:
    return [f"`{tool}` (Debian package {package})" for tool, package in TOOLS.items()
            if not shutil.which(tool)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            tier = next((t for t in ROOT_ONLY if t in str(item.fspath)), None)
            if tier:
                item.add_marker(pytest.mark.skip(reason=f"{tier} tests need root"))
        return
    # One skip reason for all, instead of each test erroring on a FileNotFoundError; a failure
    # where .ci/run requires the tiers.
    needing = [item for item in items if "tests/unit/" not in str(item.fspath)]
    if not needing or not (missing := _missing_tools()):
        return
    reason = f"needs {' and '.join(missing)}: `sudo make deps` installs it"
    if any(v == "1" for k, v in os.environ.items() if k.startswith("PYBRIDGE_REQUIRE_")):
        raise pytest.UsageError(reason)
    for item in needing:
        item.add_marker(pytest.mark.skip(reason=reason))


def _root_state() -> tuple[set[str], str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False).stdout
    return names, nft


def _our_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{TEST_PREFIX}{RUN_MARK}-")]


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    if os.geteuid() != 0 or _missing_tools():  # then only the unit tier runs
        yield
        return
    before = _root_state()
    existing = set(_our_netns())
    yield
    after = _root_state()
    leaked = sorted(set(_our_netns()) - existing)
    assert not leaked, f"test netns left behind: {leaked}"
    assert after[0] == before[0], f"root netns links changed: {after[0] ^ before[0]}"
    assert after[1] == before[1], "root netns nftables ruleset changed"


@pytest.fixture
def ipam_indexes() -> Iterator[Indexes]:
    """pyipam's store indexes as the agent keeps them (ipam.index.Indexes), fresh for one test."""
    from ipam.index import Indexes

    indexes = Indexes()
    yield indexes
    indexes.close()
