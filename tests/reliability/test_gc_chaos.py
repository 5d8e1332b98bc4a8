"""Chaos for the collector: attachments the runtime forgot, then `pybridge gc`.

Rounds of random operations on one throw-away host netns (the exec'd plugin, no agent): pods
added and kept, pods deleted properly, and faults that leave an attachment behind with no DEL
ever coming: ADD then the sandbox's netns deleted (the runtime forgot it, or a chained plugin's
DEL failed before the bridge's ran, which is the same to pybridge), ADD killed -9 at a random
moment then the netns deleted, and a wiped runtime state (half the live pods gone at once).
After each round `pybridge gc` (confirmation delay 0.1 s, no minimum age) must leave no
reservation, veth, masquerade rule or netns record that no live pod owns, and every live pod
its address.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from testbed.harness import Host, delete_netns
from tests.netns.ops import ops_conf, pybridge, write_conf

from .conftest import HostFactory, record, scale
from .crash import calibrate, start
from .ledger import Pod, addresses_of, census, cni_retry, pod_addresses

NETWORK = "testnet"
ROUNDS = scale(1, 100)
OPS_PER_ROUND = scale(20, 30)
MAX_LIVE = 24
ADD, DEL, FORGOT, KILLED, WIPED = "add", "del", "forgot", "killed", "wiped"
WEIGHTS = {ADD: 4, DEL: 3, FORGOT: 3, KILLED: 3, WIPED: 0.3}


class Chaos:
    def __init__(self, host: Host, conf: dict[str, Any], seed: int) -> None:
        self.host, self.conf = host, conf
        self.rng = random.Random(seed)
        self.live: list[Pod] = []
        self.ops: Counter[str] = Counter()
        self.forgotten = 0  # attachments left behind, some of which the killed ADD never made
        self.serial = 0
        _, self.add_seconds = calibrate(host, conf)

    def step(self) -> None:
        op = self.rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        if op in (ADD, FORGOT) and len(self.live) >= MAX_LIVE:
            op = DEL
        if op in (DEL, WIPED) and not self.live:
            op = ADD
        self.ops[op] += 1
        if op == ADD:
            self.live.append(self._add())
        elif op == FORGOT:
            self._gone(self._add())
        elif op == KILLED:
            self._killed()
        elif op == DEL:
            pod = self.live.pop(self.rng.randrange(len(self.live)))
            reply = cni_retry(self.host, "DEL", self.conf, pod.netns, pod.container_id)
            assert reply.ok, reply.stdout
            self._drop_netns(pod)
        else:
            for pod in self.rng.sample(self.live, (len(self.live) + 1) // 2):
                self.live.remove(pod)
                self._gone(pod)

    def _pod(self) -> Pod:
        self.serial += 1
        return Pod(netns=self.host.new_pod(), container_id=f"g{self.serial:05d}")

    def _add(self) -> Pod:
        pod = self._pod()
        pod.addresses = addresses_of(self.host.add(self.conf, pod.netns, pod.container_id))
        return pod

    def _killed(self) -> None:
        pod = self._pod()
        proc = start(self.host, "ADD", self.conf, pod.netns, pod.container_id)
        time.sleep(self.rng.uniform(0, self.add_seconds * 1.1))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        self._gone(pod)

    def _gone(self, pod: Pod) -> None:
        """The sandbox goes and no DEL reaches pybridge."""
        self.forgotten += 1
        self._drop_netns(pod)

    def _drop_netns(self, pod: Pod) -> None:
        self.host.pods.remove(pod.netns)
        delete_netns(pod.netns)


def netns_records(host: Host) -> set[str]:
    directory = host.data_dir / ".pybridge-netns" / NETWORK
    return set(os.listdir(directory)) if directory.exists() else set()


def collect(host: Host, conf_dir: Path, cache_dir: Path) -> dict[str, str]:
    """`pybridge gc` as an operator runs it: container id -> verdict."""
    code, out = pybridge(host, "gc", "--json", "--conf-dir", str(conf_dir), "--cache-dir", str(cache_dir),
                         "--confirm-after", "0.1", "--min-age", "0", "--runtime-socket", "off")
    assert code == 0, out
    return {row["container_id"]: row["verdict"] for row in json.loads(out)}


def test_collection_after_chaos_leaves_only_live_pods(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host()
    conf = ops_conf(host)
    conf_dir, cache_dir = write_conf(tmp_path / "conf", conf), tmp_path / "cache"
    cache_dir.mkdir()
    chaos = Chaos(host, conf, seed=2026)
    released, collect_seconds = 0, 0.0
    for _ in range(ROUNDS):
        for _ in range(OPS_PER_ROUND):
            chaos.step()
        # The kernel destroys a deleted netns' veths asynchronously; a collector run meanwhile
        # rightly keeps what still has one (the next run would release it).
        host.settle_veths(len(chaos.live))
        started = time.monotonic()
        verdicts = collect(host, conf_dir, cache_dir)
        collect_seconds += time.monotonic() - started
        live = {p.container_id for p in chaos.live}
        released += sum(1 for v in verdicts.values() if v == "released")
        assert {cid: v for cid, v in verdicts.items() if cid in live} == dict.fromkeys(live, "netns exists")
        assert all(v == "released" for cid, v in verdicts.items() if cid not in live), verdicts
        counts = census(host, NETWORK, chaos.live)
        assert not any(counts.values()), counts
        assert netns_records(host) == {f"{cid}:eth0" for cid in live}
        for pod in chaos.live:
            assert pod_addresses(host, pod) == pod.addresses, pod
    record("gc_chaos", ops=sum(chaos.ops.values()), by_op=dict(sorted(chaos.ops.items())),
           left_behind=chaos.forgotten, released=released, collections=ROUNDS,
           collect_seconds=round(collect_seconds, 1), live_at_end=len(chaos.live))
    assert chaos.ops[FORGOT] and chaos.ops[KILLED] and released  # the chaos happened
