"""The one nft runner (cni_plugin/nft.py) with stand-in nft programs: a hung or failing nft fails
the one operation within its deadline, as one NftError carrying nft's text, and the callers
(a CNI verb's masquerade and source check, the node controller's NetworkPolicy loop) keep going."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import libnft, masq, nft, sourcecheck
from cni_plugin.node import loop
from cni_plugin.node.netpol import apply
from cni_plugin.node.netpol import policy_controller as netpol
from cnikit.spec.errors import MASQ_FAILED, SOURCE_CHECK_FAILED, CNIError


def stand_in(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nft"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


@contextlib.contextmanager
def serving(agent: netpol.PolicyController) -> Iterator[threading.Thread]:
    """The policy loop serving `agent` in a thread, every kind listed (empty), until the block ends."""
    events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    for kind in netpol.WATCHED:
        events.put((kind, "SYNC", []))
    stop = threading.Event()
    thread = threading.Thread(target=netpol.serve, args=(agent, events, stop), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(10)


def until(done: Callable[[], bool], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_hung_nft_is_killed_at_its_deadline(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    hung = stand_in(tmp_path, f"echo $$ > {pid_file}; exec sleep 60")
    started = time.monotonic()
    with pytest.raises(nft.NftError, match=r"did not finish within 0\.5 s"):
        nft.run("add table inet t\n", timeout=0.5, command=[hung])
    assert time.monotonic() - started < 5
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()  # killed and reaped


def test_a_failing_nft_is_an_error_with_its_text_and_the_script_on_stdin(tmp_path: Path) -> None:
    seen = tmp_path / "stdin"
    failing = stand_in(tmp_path, f'cat > {seen}; echo "$@" >> {seen}\n'
                       'echo "/dev/stdin:1:1-3: Error: No such file or directory" >&2\n'
                       'echo "add rule x" >&2\necho "^^^" >&2\nexit 1')
    with pytest.raises(nft.NftError) as err:
        nft.run("delete table inet t\n", command=[failing], check=True)
    assert str(err.value) == "nft failed: /dev/stdin:1:1-3: Error: No such file or directory"
    assert err.value.says(nft.GONE) and not err.value.says(("File exists",))
    assert seen.read_text() == "delete table inet t\n-c -f -\n"


def test_a_listing_passes_its_command_as_arguments_and_checks_the_json(tmp_path: Path) -> None:
    lister = stand_in(tmp_path, 'echo "{\\"nftables\\": [{\\"args\\": \\"$*\\"}]}"')
    assert nft.listing("list table inet t", command=[lister]) == [{"args": "-j list table inet t"}]
    garbled = stand_in(tmp_path, 'echo "{\\"nftables\\": 3}"')
    with pytest.raises(nft.NftError, match="list chains: unexpected JSON listing"):
        nft.listing("list chains", command=[garbled])


def test_no_nft_is_an_nft_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft.hostnet, "find_binary", lambda _name: None)
    with pytest.raises(nft.NftError, match="not found in PATH or sbin"):
        nft.run("list ruleset")


def test_a_hung_nft_fails_one_masquerade_setup_as_cni_error_120(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hang = tmp_path / "hang"
    hang.touch()
    works = stand_in(tmp_path, f'if [ -e {hang} ]; then exec sleep 60; fi\n'
                     'case "$*" in *list*) echo \'{"nftables": []}\';; *) cat > /dev/null;; esac')
    monkeypatch.setattr(masq, "_binary", lambda name: works if name == "nft" else None)
    monkeypatch.setattr(nft, "TIMEOUT", 0.5)
    with pytest.raises(CNIError) as err:
        masq.setup("n", "c1", "eth0", [IPv4Interface("10.1.0.2/24")], masq.NFTABLES)
    assert err.value.code == MASQ_FAILED == 120 and "did not finish within 0.5 s" in str(err.value)
    hang.unlink()  # the next call of the same process goes through
    masq.setup("n", "c1", "eth0", [IPv4Interface("10.1.0.2/24")], masq.NFTABLES)


def test_a_hung_nft_fails_one_source_check_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hung = stand_in(tmp_path, "exec sleep 60")
    monkeypatch.setattr(libnft, "available", lambda: False)  # the exec'd path: the one that can hang
    monkeypatch.setattr(nft.hostnet, "find_binary", lambda _name: hung)
    monkeypatch.setattr(nft, "TIMEOUT", 0.5)

    def no_socket(*_: object) -> None:
        raise OSError("no netlink socket")  # setup's batch: nft is what runs then (and no kernel here)
    monkeypatch.setattr(sourcecheck.nfbatch, "send", no_socket)
    with pytest.raises(CNIError) as err:
        sourcecheck.setup("n", "c1", "eth0", "veth1", "02:00:00:00:00:01", [], ipv6=False)
    assert err.value.code == SOURCE_CHECK_FAILED and "did not finish within 0.5 s" in str(err.value)


def test_a_hung_nft_fails_a_ruleset_and_the_policy_loop_retries_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    # hangs on its first two runs, then takes the script
    flaky = stand_in(tmp_path, f'echo x >> {runs}; [ "$(wc -l < {runs})" -gt 2 ] || exec sleep 60\n'
                     "cat > /dev/null")
    monkeypatch.setattr(nft, "TIMEOUT", 0.5)
    logged: list[tuple[str, dict[str, Any]]] = []
    agent = netpol.PolicyController("me", lambda script: apply.replace(script, [flaky]),
                               lambda event, **fields: logged.append((event, fields)))
    monkeypatch.setattr(loop.Backoff, "next", lambda _self: 0.1)
    with serving(agent) as thread:
        until(lambda: agent.applied is not None)
        assert agent.applied is not None and thread.is_alive()
    errors = [fields["error"] for event, fields in logged if event == "netpol-error"]
    assert errors == ["nft failed: did not finish within 0.5 s"] * 2
    assert runs.read_text().count("x") == 3


def test_a_hung_libnftables_call_fails_rulesets_until_it_returns_then_the_tables_go_in_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.cni_plugin.test_libnft import FakeLib

    class Hanging(FakeLib):  # the first run hangs until released
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.scripts: list[str] = []

        def nft_run_cmd_from_buffer(self, ctx: int, script: bytes) -> int:
            self.scripts.append(script.decode())
            if len(self.scripts) == 1:
                self.release.wait(30)
            return super().nft_run_cmd_from_buffer(ctx, script)

    lib = Hanging()
    monkeypatch.setattr(libnft, "_lib", lambda: lib)
    monkeypatch.setattr(libnft, "_kept", [])
    monkeypatch.setattr(libnft.netns, "thread_netns", lambda: (1, 1))
    monkeypatch.setattr(nft.hostnet, "find_binary", lambda _name: None)  # never this machine's nft
    monkeypatch.setattr(nft, "TIMEOUT", 0.3)
    monkeypatch.setattr(loop.Backoff, "next", lambda _self: 0.05)
    logged: list[tuple[str, dict[str, Any]]] = []
    agent = netpol.PolicyController("me", apply.replace,
                                    lambda event, **fields: logged.append((event, fields)))

    def errors() -> list[str]:
        return [fields["error"] for event, fields in logged if event == "netpol-error"]
    try:
        with serving(agent) as thread:
            until(lambda: len(errors()) >= 3)
            assert errors()[:3] == ["nft failed: libnftables did not answer within 0.3 s"] + [
                "nft failed: an earlier libnftables call has not returned"] * 2
            assert agent.applied is None and len(lib.scripts) == 1  # no other call reached the library
            lib.release.set()
            until(lambda: agent.applied is not None)
            assert agent.applied is not None and thread.is_alive()
    finally:
        lib.release.set()
    assert lib.scripts[1:] == [agent.applied]  # after it returned: the tables whole, once
