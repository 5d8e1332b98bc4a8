from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin.install import install
from cnikit.spec.version import SUPPORTED
from testbed.harness import Host, new_netns


@pytest.fixture(scope="session")
def launchers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pybridge and pyipam installed the way `make install` does it: the compiled client in
    bin/, the Python launchers it falls back to in libexec/."""
    root = tmp_path_factory.mktemp("install")
    install(str(root / "bin"), str(root / "libexec"))
    return root / "bin"


@pytest.fixture(params=SUPPORTED)
def spec_version(request: pytest.FixtureRequest) -> str:
    """The core ADD/CHECK/DEL tests run once per supported spec version."""
    return str(request.param)


# Every netns test runs twice: calls forwarded to a resident agent, and served in-process by
# the launcher when no agent listens. Both must give the same results.
@pytest.fixture(params=["inprocess", "agent"])
def host(request: pytest.FixtureRequest, tmp_path: Path, launchers: Path) -> Iterator[Host]:
    h = Host(name=new_netns("host"), data_dir=tmp_path / "ipam", bin_dir=launchers,
             agent_socket=tmp_path / "agent" / "agent.sock")
    try:
        h.exec("ip", "link", "set", "lo", "up")
        if request.param == "agent":
            h.start_agent(tmp_path / "agent.log")
        yield h
        if request.param == "agent":
            # None: the test stopped it itself.
            assert h.stop_agent() in (None, 0), (tmp_path / "agent.log").read_text()
            assert "Traceback" not in (tmp_path / "agent.log").read_text()
    finally:
        h.destroy()
