"""Churn on one network from parallel workers, and a store lock held forever."""

from __future__ import annotations

import concurrent.futures
import random
import subprocess
import sys
import time
from collections import Counter

from testbed.harness import Host, bridge_conf, delete_netns

from .conftest import HostFactory, record, scale
from .ledger import Pod, addresses_of, census


def _worker(
    host: Host, conf: dict[str, object], worker: int, cycles: int
) -> tuple[Counter[str], Pod | None]:
    rng = random.Random(worker)
    seen: Counter[str] = Counter()
    last: Pod | None = None
    for i in range(cycles):
        pod = Pod(host.new_pod(), f"w{worker}-{i}")
        add = host.cni("ADD", conf, pod.netns, pod.container_id)
        seen["add"] += 1
        if not add.ok:
            seen[f"add_error:{add.stdout[:120]!r}"] += 1
            continue
        pod.addresses = addresses_of(add.out)
        if i == cycles - 1:
            last = pod  # each worker's last pod stays: the store must equal these at the end
            break
        for _ in range(2 if rng.random() < 0.3 else 1):  # a repeated DEL
            reply = host.cni("DEL", conf, pod.netns, pod.container_id)
            seen["del"] += 1
            if not reply.ok:
                seen[f"del_error:{reply.stdout[:120]!r}"] += 1
        if rng.random() < 0.2:  # a DEL for a container nobody ever added
            reply = host.cni("DEL", conf, pod.netns, f"unknown-{worker}-{i}")
            seen["del_unknown"] += 1
            if not reply.ok:
                seen[f"del_error:{reply.stdout[:120]!r}"] += 1
        host.pods.remove(pod.netns)
        delete_netns(pod.netns)
    return seen, last


def test_churn_parallel_add_del_leaves_the_store_equal_to_the_live_pods(make_host: HostFactory) -> None:
    host = make_host(agent=True)
    conf = bridge_conf(host, ipMasq=True)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]]
    workers = scale(8, 16)
    cycles = -(-scale(96, 1000) // workers)  # rounded up: at least that many cycles in all
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(lambda w: _worker(host, conf, w, cycles), range(workers)))
    elapsed = time.monotonic() - started
    seen: Counter[str] = sum((c for c, _ in done), Counter())
    live = [p for _, p in done if p is not None]
    counts = census(host, "testnet", live)
    errors = {k: v for k, v in seen.items() if "error" in k}
    record("churn", workers=workers, cycles=workers * cycles, calls=sum(v for k, v in seen.items()
           if ":" not in k), errors=sum(errors.values()), seconds=round(elapsed, 1),
           live_at_end=len(live), store_at_end=len(host.reservations("testnet")), census=counts)
    assert errors == {}
    assert len(live) == workers
    assert not any(counts.values()), counts


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(3600)
"""


def test_a_stuck_lock_holder_gives_try_again_within_the_timeout_and_its_death_frees_it(
    make_host: HostFactory,
) -> None:
    for agent in (False, True):
        host = make_host(agent=agent)
        conf = bridge_conf(host)
        conf["ipam"]["lockTimeout"] = 1.0
        (host.data_dir / "testnet").mkdir(parents=True)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(host.data_dir / "testnet" / "lock")],
                                  stdout=subprocess.PIPE)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            pod = host.new_pod()
            timings = []
            for verb in ("ADD", "DEL", "STATUS"):
                started = time.monotonic()
                reply = host.cni(verb, conf, pod, "c1")
                timings.append(time.monotonic() - started)
                assert reply.rc != 0 and reply.out["code"] == 11, (verb, reply.stdout)
                assert "lock" in reply.out["msg"]
            # Another network is not held up meanwhile (the agent serves calls concurrently).
            other = bridge_conf(host, name="othernet", bridge="br-other")
            other["ipam"]["ranges"] = [[{"subnet": "10.89.0.0/24"}]]
            assert host.cni("ADD", other, host.new_pod(), "o1").ok
            # The ADD that got 11 left nothing: the only veth is othernet's, the pod has no eth0.
            assert len([n for n in host.links() if n.startswith("veth")]) == 1
            assert host.pod_exec(pod, "ip", "link", "show", "eth0", check=False).returncode != 0
            assert all(t < 1.0 + 4.0 for t in timings), timings
        finally:
            holder.kill()
            holder.wait()
        assert host.cni("ADD", conf, pod, "c1").ok
        record(f"lock_contention[{'agent' if agent else 'inprocess'}]", lock_timeout_s=1.0,
               seconds_to_code_11=[round(t, 2) for t in timings])
