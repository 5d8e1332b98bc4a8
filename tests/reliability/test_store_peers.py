"""Issue 13, item 3: the IPAM store trusts nothing it finds, and no wait on it is unbounded."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from testbed.harness import Reply, bridge_conf

from .conftest import HostFactory, record

BOTH = pytest.mark.parametrize("agent", [False, True], ids=["inprocess", "agent"])


@BOTH
def test_a_fifo_as_the_store_lock_is_an_error_not_a_hang(make_host: HostFactory, agent: bool) -> None:
    host = make_host(agent=agent)
    conf = bridge_conf(host, ipam={**bridge_conf(host)["ipam"], "lockTimeout": 1})
    store = host.data_dir / "testnet"
    store.mkdir(parents=True, mode=0o700)
    os.mkfifo(store / "lock", 0o600)
    pod = host.new_pod()
    timings = {}
    for verb in ("ADD", "DEL"):  # the DEL of the same attachment must not wait on the ADD
        started = time.monotonic()
        reply = host.cni(verb, conf, pod, "fifo", timeout=20)
        timings[verb] = round(time.monotonic() - started, 2)
        assert reply.rc != 0 and reply.out["code"] == 5, reply.stdout
        assert f"{store}/lock" in reply.out["details"] and "regular file" in reply.out["details"]
    assert "br-test" not in host.links() or host.settle_veths(0) == []
    record(f"lock_fifo[{'agent' if agent else 'inprocess'}]", add_seconds_to_error=timings["ADD"],
           del_seconds_to_error=timings["DEL"])


def _unsafe_stores(root: Path) -> list[tuple[str, Path, Path]]:
    """(what, dataDir, the directory at fault) for stores someone else can write to."""
    cases = []
    for what, mode, uid, at_fault in (("dataDir 0777", 0o777, 0, "data"), ("dataDir 0775", 0o775, 0, "data"),
                                      ("network dir 0777", 0o777, 0, "net"),
                                      ("network dir of uid 65534", 0o700, 65534, "net")):
        data = root / what.replace(" ", "-")
        net = data / "testnet"
        net.mkdir(parents=True, mode=0o700)
        target = data if at_fault == "data" else net
        os.chmod(target, mode)
        os.chown(target, uid, uid)
        cases.append((what, data, target))
    return cases


@BOTH
def test_a_store_directory_others_can_write_is_refused(
    make_host: HostFactory, tmp_path: Path, agent: bool
) -> None:
    host = make_host(agent=agent)
    os.chmod(tmp_path, 0o755)
    for what, data, at_fault in _unsafe_stores(tmp_path / "stores"):
        conf = bridge_conf(host)
        conf["ipam"]["dataDir"] = str(data)
        reply = host.cni("ADD", conf, host.new_pod(), "c1")
        assert reply.rc != 0 and reply.out["code"] == 5, (what, reply.stdout)
        assert str(at_fault) in reply.out["details"], (what, reply.stdout)
        assert list((data / "testnet").iterdir()) == [], what
    assert host.settle_veths(0) == []


def _hold_flock(path: Path, locked: threading.Event, release: threading.Event) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        locked.set()
        release.wait(60)
    finally:
        os.close(fd)


def test_a_call_waits_for_its_attachment_only_so_long(make_host: HostFactory) -> None:
    """An ADD stuck on the IPAM lock (held elsewhere, lockTimeout 40 s) keeps its attachment
    busy in the agent: the DEL of that attachment is told to try again later, not kept waiting."""
    host = make_host(agent=True)
    conf = bridge_conf(host, ipam={**bridge_conf(host)["ipam"], "lockTimeout": 40})
    pod = host.new_pod()
    assert host.cni("STATUS", conf).ok  # makes the store and its lock file
    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_flock, args=(host.data_dir / "testnet" / "lock", locked, release))
    holder.start()
    adding: list[Reply] = []
    try:
        assert locked.wait(10)
        add = threading.Thread(target=lambda: adding.append(host.cni("ADD", conf, pod, "busy", timeout=60)))
        add.start()
        time.sleep(1.0)
        started = time.monotonic()
        try:
            reply = host.cni("DEL", conf, pod, "busy", timeout=35)
        except subprocess.TimeoutExpired:
            pytest.fail("DEL waited on the attachment for 35 s")
        waited = time.monotonic() - started
    finally:
        release.set()
        holder.join()
    add.join()
    assert reply.rc != 0 and reply.out["code"] == 11, reply.stdout
    assert waited < 30, waited
    assert adding and adding[0].ok, adding  # the ADD got the lock once it was free
    assert host.cni("DEL", conf, pod, "busy").ok
    record("attachment_wait", del_seconds_to_try_again=round(waited, 1))
