"""The collector of attachments the runtime forgot (cni_plugin/ops/collector.py): its decision,
pure, against every combination of facts, and one collection run with the I/O faked."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cni_plugin.ops import collector
from cni_plugin.ops.agent_metrics import Metrics
from cni_plugin.ops.collector import RELEASE, Candidate, Policy, decide
from cnikit import log

POLICY = Policy(min_age=60, confirm_after=10)
DEAD = Candidate("testnet", "c1", "eth0", ("10.88.0.2",), "/run/netns/gone", netns_exists=False, veth=False,
                 age=600.0)


def _two_rounds(c: Candidate, apart: float = 10, busy: frozenset[tuple[str, str]] = frozenset()) -> str:
    first = decide([c], {}, 1000.0, busy, POLICY)
    return decide([c], first.suspects, 1000.0 + apart, busy, POLICY).verdicts[0][1]


def test_dead_at_two_observations_apart_is_released() -> None:
    first = decide([DEAD], {}, 1000.0, set(), POLICY)
    assert first.verdicts == [(DEAD, collector.FIRST_SIGHTING)] and first.releases == []
    assert decide([DEAD], first.suspects, 1010.0, set(), POLICY).releases == [DEAD]


def test_one_observation_never_releases_however_old() -> None:
    assert decide([DEAD], {}, 1e6, set(), Policy(min_age=0, confirm_after=0)).releases == []


def test_two_observations_too_close_keep_it() -> None:
    assert _two_rounds(DEAD, apart=9.5) == collector.FIRST_SIGHTING


def test_a_sighting_alive_in_between_starts_over() -> None:
    first = decide([DEAD], {}, 1000.0, set(), POLICY)
    alive = decide([dataclasses.replace(DEAD, netns_exists=True)], first.suspects, 1010.0, set(), POLICY)
    assert alive.suspects == {}
    assert decide([DEAD], alive.suspects, 1020.0, set(), POLICY).releases == []


def test_another_reservation_under_the_same_name_starts_over() -> None:
    first = decide([DEAD], {}, 1000.0, set(), POLICY)
    moved = dataclasses.replace(DEAD, addresses=("10.88.0.3",))
    assert decide([moved], first.suspects, 1010.0, set(), POLICY).releases == []


@pytest.mark.parametrize(("change", "reason"), [
    ({"netns_exists": True}, collector.NETNS_EXISTS),
    ({"netns": "", "netns_exists": False}, collector.NETNS_UNKNOWN),
    ({"veth": True}, collector.VETH_PRESENT),
    ({"veth": None}, collector.VETH_UNKNOWN),
    ({"age": 59.0}, collector.TOO_YOUNG),
    ({"age": None}, collector.TOO_YOUNG),
])
def test_each_doubt_keeps_it(change: dict[str, object], reason: str) -> None:
    assert _two_rounds(dataclasses.replace(DEAD, **change)) == reason  # type: ignore[arg-type]


def test_a_call_in_flight_keeps_it() -> None:
    assert _two_rounds(DEAD, busy=frozenset({("c1", "eth0")})) == collector.IN_FLIGHT
    assert _two_rounds(DEAD, busy=frozenset({("c1", "eth1"), ("c2", "eth0")})) == RELEASE


def _every_candidate() -> Iterator[Candidate]:
    ages = (None, 0.0, 59.9, 60.0, 1e5)
    facts = itertools.product(("", "/run/netns/x"), (False, True), (False, True, None), ages)
    for netns, exists, veth, age in facts:
        yield dataclasses.replace(DEAD, netns=netns, netns_exists=exists, veth=veth, age=age)


@pytest.mark.parametrize("busy", [False, True])
def test_invariants_over_every_combination(busy: bool) -> None:
    """Never released: a listed (live) veth, an existing or unknown netns, a reservation younger
    than the minimum age, a call in flight; and released once all of those say dead."""
    in_flight = {("c1", "eth0")} if busy else set()
    for c in _every_candidate():
        verdict = _two_rounds(c, busy=frozenset(in_flight))
        dead = not busy and bool(c.netns) and not c.netns_exists and c.veth is False \
            and c.age is not None and c.age >= POLICY.min_age
        assert (verdict == RELEASE) == dead, (c, verdict)


# One run with the I/O faked: the runtime socket is real (tmp_path), the observation is not.

class Events:
    def __init__(self) -> None:
        self.released: list[str] = []
        self.runs: list[str] = []

    def collected(self, network: str) -> None:
        self.released.append(network)

    def collection(self, outcome: str) -> None:
        self.runs.append(outcome)


class Runner:
    def __init__(self, answer: tuple[int, str] | None = (0, "")) -> None:
        self.answer = answer
        self.calls: list[tuple[tuple[str, str], dict[str, str], dict[str, object]]] = []

    def __call__(self, key: tuple[str, str], env: Mapping[str, str], stdin: bytes) -> tuple[int, str] | None:
        self.calls.append((key, dict(env), json.loads(stdin)))
        return self.answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "runtime.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    yield path
    sock.close()


def _conf_dir(tmp_path: Path, plugin_type: str = "pybridge") -> Path:
    directory = tmp_path / "conf"
    directory.mkdir()
    (directory / "10-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "testnet",
        "plugins": [{"type": plugin_type, "bridge": "br-test", "ipMasq": True,
                     "ipam": {"type": "pyipam", "ranges": [[{"subnet": "10.88.0.0/24"}]]}},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    return directory


def _collector(tmp_path: Path, runtime_socket: Path, runner: Runner, found: list[Candidate],
               monkeypatch: pytest.MonkeyPatch, busy: set[tuple[str, str]] | None = None
               ) -> tuple[collector.Collector, Events, Clock, io.StringIO]:
    monkeypatch.setattr(collector, "observe", lambda _confs, _cache: list(found))
    (tmp_path / "cache").mkdir(exist_ok=True)
    settings = collector.Settings(str(_conf_dir(tmp_path)), str(tmp_path / "cache"), str(runtime_socket),
                                  POLICY, "/opt/cni/bin")
    events, clock, out = Events(), Clock(), io.StringIO()
    run = collector.Collector(settings, runner, lambda: set(busy or ()), events, clock, log.Logger(out))
    return run, events, clock, out


def _events(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_run_releases_through_the_plugins_del_and_drops_the_cache_entry(
        tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner()
    run, events, clock, out = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch)
    cached = tmp_path / "cache" / "testnet-c1-eth0"
    cached.write_text("{}")
    assert run.run_once() is not None and runner.calls == []
    clock.now += 10
    decision = run.run_once()
    assert decision is not None and decision.verdicts == [(DEAD, collector.RELEASED)]
    (key, env, stdin), = runner.calls
    assert key == ("c1", "eth0")
    assert env == {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "",
                   "CNI_PATH": "/opt/cni/bin"}
    assert stdin["type"] == "pybridge" and stdin["ipMasq"] is True
    assert (stdin["name"], stdin["cniVersion"]) == ("testnet", "1.0.0")
    assert not cached.exists()
    assert events.released == ["testnet"] and events.runs == ["done", "done"]
    released, = [e for e in _events(out) if e["event"] == "gc_released"]
    assert (released["container_id"], released["addresses"], released["netns"]) == ("c1", ["10.88.0.2"],
                                                                                    "/run/netns/gone")


def test_a_cache_entry_that_cannot_go_leaves_the_release_standing(
        tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner()
    run, events, clock, out = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch)
    (tmp_path / "cache" / "testnet-c1-eth0").mkdir()  # unlink fails (EISDIR), as on a read-only mount
    run.run_once()
    clock.now += 10
    decision = run.run_once()
    assert decision is not None and decision.verdicts == [(DEAD, collector.RELEASED)]
    assert events.released == ["testnet"] and events.runs == ["done", "done"]
    assert [e["event"] for e in _events(out)] == ["gc_cache_entry_kept", "gc_released"]


def test_a_dry_run_releases_nothing(tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner()
    run, events, clock, _ = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch)
    run.run_once(dry_run=True)
    clock.now += 10
    decision = run.run_once(dry_run=True)
    assert decision is not None and decision.releases == [DEAD]
    assert runner.calls == [] and events.released == []


def test_a_call_that_took_the_lock_meanwhile_keeps_it(tmp_path: Path, runtime: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner(answer=None)  # the agent's attachment lock was held: nothing ran
    run, events, clock, _ = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch)
    (tmp_path / "cache" / "testnet-c1-eth0").write_text("{}")
    run.run_once()
    clock.now += 10
    decision = run.run_once()
    assert decision is not None and decision.verdicts == [(DEAD, collector.IN_FLIGHT)]
    assert (tmp_path / "cache" / "testnet-c1-eth0").exists() and events.released == []


def test_the_agents_in_flight_set_is_asked(tmp_path: Path, runtime: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner()
    run, _, clock, _ = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch, busy={("c1", "eth0")})
    run.run_once()
    clock.now += 10
    assert run.run_once() is not None and runner.calls == []


def test_a_failed_del_keeps_the_cache_entry_and_counts(tmp_path: Path, runtime: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner(answer=(1, '{"code": 7, "msg": "masquerade teardown failed"}'))
    run, events, clock, out = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch)
    (tmp_path / "cache" / "testnet-c1-eth0").write_text("{}")
    run.run_once()
    clock.now += 10
    decision = run.run_once()
    assert decision is not None and decision.verdicts[0][1].startswith("release failed")
    assert (tmp_path / "cache" / "testnet-c1-eth0").exists()
    assert events.runs == ["done", "failed"] and events.released == []
    assert [e["event"] for e in _events(out)] == ["gc_release_failed"]


def _refusing(tmp_path: Path) -> Path:
    path = tmp_path / "refusing.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # bound, never listening: connect() is refused
    sock.close()
    return path


@pytest.mark.parametrize("fault", ["absent", "refusing"])
def test_an_unreachable_runtime_releases_nothing_logged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             fault: str) -> None:
    path = tmp_path / "absent.sock" if fault == "absent" else _refusing(tmp_path)
    runner = Runner()
    run, events, clock, out = _collector(tmp_path, path, runner, [DEAD], monkeypatch)
    for _ in range(4):
        assert run.run_once() is None
        clock.now += 10
    assert runner.calls == [] and events.runs == ["runtime_unreachable"] * 4
    skipped, = _events(out)
    assert skipped["event"] == "gc_skipped" and str(path) in str(skipped["reason"])


def test_an_outage_between_two_observations_starts_over(tmp_path: Path, runtime: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    runner = Runner()
    run, _, clock, out = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch)
    run.run_once()
    run.settings.runtime_socket = str(tmp_path / "gone.sock")
    clock.now += 10
    assert run.run_once() is None
    run.settings.runtime_socket = str(runtime)
    clock.now += 10
    assert run.run_once() is not None and runner.calls == []  # a first sighting again
    assert [e["event"] for e in _events(out)] == ["gc_skipped", "gc_resumed"]


def test_a_failed_observation_releases_nothing(tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    runner = Runner()
    run, events, clock, _ = _collector(tmp_path, runtime, runner, [DEAD], monkeypatch)
    run.run_once()

    def broken(_confs: object, _cache: object) -> list[Candidate]:
        raise OSError("netlink: no buffer space")

    monkeypatch.setattr(collector, "observe", broken)
    clock.now += 10
    assert run.run_once() is None and events.runs == ["done", "failed"]
    monkeypatch.setattr(collector, "observe", lambda _c, _d: [DEAD])
    clock.now += 10
    run.run_once()
    assert runner.calls == []  # the failure ended the suspicion


def test_only_pybridge_networks_are_collected(tmp_path: Path) -> None:
    from cni_plugin.ops import networks

    assert list(collector.collectable(networks.load_all(str(_conf_dir(tmp_path))))) == ["testnet"]
    other = tmp_path / "other"
    other.mkdir()
    assert collector.collectable(networks.load_all(str(_conf_dir(other, "bridge")))) == {}


@pytest.mark.parametrize(("given", "env", "expected"), [
    (None, None, 60.0), ("5", None, 5.0), (None, "0.5", 0.5), ("0", "9", 0.0)])
def test_seconds(monkeypatch: pytest.MonkeyPatch, given: str | None, env: str | None,
                 expected: float) -> None:
    if env is not None:
        monkeypatch.setenv("PYBRIDGE_GC_MIN_AGE", env)
    assert collector.seconds("--gc-min-age", given, "PYBRIDGE_GC_MIN_AGE", 60.0) == expected


@pytest.mark.parametrize(("given", "env", "named"), [
    ("-1", None, "--gc-min-age: '-1'"), ("soon", None, "--gc-min-age: 'soon'"),
    (None, "nan", "PYBRIDGE_GC_MIN_AGE: 'nan'"), (None, "inf", "PYBRIDGE_GC_MIN_AGE: 'inf'")])
def test_bad_seconds_name_the_setting(monkeypatch: pytest.MonkeyPatch, given: str | None, env: str | None,
                                      named: str) -> None:
    if env is not None:
        monkeypatch.setenv("PYBRIDGE_GC_MIN_AGE", env)
    with pytest.raises(ValueError, match=named):
        collector.seconds("--gc-min-age", given, "PYBRIDGE_GC_MIN_AGE", 60.0)


def test_the_metrics() -> None:
    metrics = Metrics(registry := CollectorRegistry())
    metrics.collected("testnet")
    metrics.collection("runtime_unreachable")
    metrics.collection("runtime_unreachable")
    assert registry.get_sample_value("pybridge_gc_released_total", {"network": "testnet"}) == 1
    assert registry.get_sample_value("pybridge_gc_runs_total", {"outcome": "runtime_unreachable"}) == 2
