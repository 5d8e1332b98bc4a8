"""Hostile and broken input: traversal and injection, host links pybridge does not own, FIFOs
and symlinks where files are expected, a corrupted store, the agent socket, permissions."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed.harness import Host, bridge_conf

from .conftest import HostFactory, record

LONG = "a" * 5000
ESCAPES = ["../escape", "../../../../tmp/escape", "/abs/escape", "a/../../escape", "..", ".",
           "a\nb", "a\rb", "a b", "a\tb", "-rf", "$(touch /tmp/pwn)", "`id`", "a;b", LONG, ""]


def _snapshot(host: Host, root: Path) -> tuple[set[str], str, set[str]]:
    links = set(host.links())
    nft = host.exec("nft", "list", "ruleset").stdout.decode()
    files = {str(p) for p in root.rglob("*")}
    return links, nft, files


def _ifname_like_ok(value: str) -> bool:
    """Whether a bridge or interface name is one Linux takes (odd but harmless names are fine:
    names go to netlink as data, never through a shell or into a path)."""
    return 0 < len(value) <= 15 and value not in (".", "..") and not any(
        c == "/" or c == ":" or c.isspace() for c in value)


Call = tuple[str, str, dict[str, Any], dict[str, str], tuple[int, ...]]


def _hostile_calls(host: Host, tmp_path: Path) -> list[Call]:
    """(what, verb, config, CNI_* overrides, accepted error codes) for escapes in every field."""
    calls: list[Call] = []
    base = bridge_conf(host, ipMasq=True)
    ipam = base["ipam"]
    for value in ESCAPES:
        calls.append(("name", "ADD", {**base, "name": value}, {}, (7,)))
        calls.append(("name", "DEL", {**base, "name": f"net\0{value}"}, {}, (7,)))
        if not _ifname_like_ok(value):
            calls.append(("bridge", "ADD", {**base, "bridge": value}, {}, (7,)))
        path = value if value.startswith("/") else f"{tmp_path}/{value}"
        if ".." in path.split("/"):
            for field in ("dataDir", "resolvConf"):
                calls.append((field, "ADD", {**base, "ipam": {**ipam, field: path}}, {}, (7,)))
                calls.append((field, "DEL", {**base, "ipam": {**ipam, field: path}}, {}, (7,)))
        calls.append(("logFile", "ADD", {**base, "logFile": f"{tmp_path}/{value}/../x.log"}, {}, (7,)))
        if not value.startswith("/"):
            calls.append(("logFile", "ADD", {**base, "logFile": value}, {}, (7,)))
        for verb in ("ADD", "DEL", "CHECK"):
            calls.append(("CNI_CONTAINERID", verb, base, {"CNI_CONTAINERID": value}, (4,)))
            if not _ifname_like_ok(value):
                calls.append(("CNI_IFNAME", verb, base, {"CNI_IFNAME": value}, (4,)))
        if not value.startswith("/"):
            calls.append(("CNI_NETNS", "ADD", base, {"CNI_NETNS": value}, (4, 8)))
    for field in ("dataDir", "resolvConf", "logFile"):
        for bad in (f"{tmp_path}/x\0y", "relative/path", 42, ["/tmp"], {"a": 1}):
            conf = {**base, field: bad} if field == "logFile" else {**base, "ipam": {**ipam, field: bad}}
            calls.append((field, "ADD", conf, {}, (7,)))
    for netns in ("/etc/passwd", "/dev/null", "/proc/self/ns/net", "/proc/1/ns/net", str(tmp_path)):
        calls.append(("CNI_NETNS", "ADD", base, {"CNI_NETNS": netns}, (8,)))
    return calls


@pytest.mark.parametrize("agent", [False, True], ids=["inprocess", "agent"])
def test_escaping_names_and_paths_are_refused_before_anything_is_touched(
    make_host: HostFactory, tmp_path: Path, agent: bool
) -> None:
    host = make_host(agent=agent)
    pod = host.new_pod()
    canary = Path("/tmp/escape")
    assert not canary.exists()
    calls = _hostile_calls(host, tmp_path)
    before = _snapshot(host, tmp_path)
    for what, verb, conf, env, codes in calls:
        cid = env.get("CNI_CONTAINERID", "c1")
        ifname = env.get("CNI_IFNAME", "eth0")
        netns = env.get("CNI_NETNS", f"/run/netns/{pod}")
        reply = host.cni(verb, conf, None, cid, ifname, netns_path=netns)
        assert reply.rc != 0, (what, verb, reply.stdout)
        assert reply.out["code"] in codes and reply.out["msg"], (what, verb, reply.stdout)
    assert _snapshot(host, tmp_path) == before
    assert not canary.exists() and not Path("/tmp/pwn").exists()
    assert [p for p in host.links() if p.startswith(("veth", "br-"))] == []
    record(f"hostile_names[{'agent' if agent else 'inprocess'}]", calls=len(calls), refused=len(calls),
           touched=0)


def test_del_and_check_never_touch_a_host_link_pybridge_did_not_create(make_host: HostFactory) -> None:
    host = make_host()
    conf = bridge_conf(host)
    host.exec("ip", "link", "add", "hostlink0", "type", "bridge")
    pod = host.new_pod()
    result = host.add(conf, pod, "c1")
    # CNI_NETNS naming the plugin's own netns, CNI_IFNAME naming a host link: refused.
    own = host.cni("DEL", conf, netns_path=f"/run/netns/{host.name}", container_id="c1", ifname="hostlink0")
    assert own.rc != 0 and own.out["code"] == 8, own.stdout
    own_proc = host.cni("DEL", conf, netns_path="/proc/self/ns/net", container_id="x", ifname="hostlink0")
    assert own_proc.rc != 0 and own_proc.out["code"] == 8
    # prevResult naming host links, in DEL and CHECK.
    bogus = {**result, "interfaces": [{"name": "hostlink0"}, {"name": "lo"}, {"name": "hostlink0"}]}
    assert host.cni("CHECK", {**conf, "prevResult": bogus}, pod, "c1").rc != 0
    # In the pod, a link by the pod's ifname that is not a veth is someone else's.
    other = host.new_pod()
    host.pod_exec(other, "ip", "link", "add", "eth0", "type", "bridge")
    assert host.cni("DEL", {**conf, "prevResult": bogus}, other, "c2").ok
    assert host.pod_exec(other, "ip", "link", "show", "eth0", check=False).returncode == 0
    assert "hostlink0" in host.links() and "lo" in host.links()
    assert host.cni("DEL", {**conf, "prevResult": bogus}, pod, "c1").ok
    assert "hostlink0" in host.links()


@pytest.mark.parametrize("agent", [False, True], ids=["inprocess", "agent"])
def test_fifos_and_symlinks_where_files_are_expected_fail_fast(
    make_host: HostFactory, tmp_path: Path, agent: bool
) -> None:
    host = make_host(agent=agent)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "target"
    target.write_text("precious\n")
    link = tmp_path / "log-link"
    link.symlink_to(target)
    conf = bridge_conf(host)
    started = time.monotonic()
    assert host.cni("ADD", conf, netns_path=str(fifo)).out["code"] == 8
    assert host.cni("ADD", conf, netns_path="/dev/null").out["code"] == 8
    assert host.cni("ADD", conf, netns_path=str(target)).out["code"] == 8
    for path in (fifo, link):
        reply = host.cni("STATUS", {**conf, "logFile": str(path)})
        assert reply.out["code"] == 7 and "logFile" in reply.out["msg"], reply.stdout
    assert time.monotonic() - started < 30
    assert target.read_text() == "precious\n"


def test_a_corrupted_store_is_reported_skipped_and_never_overwritten(
    make_host: HostFactory, tmp_path: Path
) -> None:
    host = make_host()
    conf = bridge_conf(host)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/28"}]]  # .2 - .14
    live = host.add(conf, host.new_pod(), "live")
    live_ip = live["ips"][0]["address"].split("/")[0]
    store = host.data_dir / "testnet"
    canary = tmp_path / "canary"
    canary.write_text("canary\n")
    junk: dict[str, bytes | None] = {
        "10.88.0.3": b"",  # truncated
        "10.88.0.4": b"\xff\xfe\x00garbage\r\n\x00",
        "10.88.0.5": b"x" * 5000,  # too big
        "10.88.0.6": b"../../etc\r\neth0",  # an invalid container id
        "010.088.000.007": b"c\r\neth0",  # not a canonical name: foreign
        "README": b"hello",
    }
    for name, data in junk.items():
        (store / name).write_bytes(data or b"")
    (store / "10.88.0.8").mkdir()
    (store / "10.88.0.9").symlink_to(canary)
    os.mkfifo(store / "10.88.0.10")
    (store / "last_reserved_ip.0").write_text("192.168.1.1")  # outside the range
    snapshot = {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                for p in store.iterdir() if not stat.S_ISFIFO(p.lstat().st_mode)}
    got = []
    for i in range(5):
        reply = host.cni("ADD", conf, host.new_pod(), f"new-{i}")
        assert reply.ok, reply.stdout
        assert b"not a reservation file" in reply.stderr
        got.append(reply.out["ips"][0]["address"].split("/")[0])
    # .7 is free: "010.088.000.007" is no host-local spelling, so no reservation of .7.
    assert set(got).isdisjoint({live_ip, *(f"10.88.0.{n}" for n in (3, 4, 5, 6, 8, 9, 10))})
    for name, data in snapshot.items():
        if data is not None and name != "last_reserved_ip.0":
            assert (store / name).read_bytes() == data, name
    assert canary.read_text() == "canary\n"
    # GC releases what it can attribute and leaves the rest (it may be a live pod's).
    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "live", "ifname": "eth0"}]}
    assert host.cni("GC", gc_conf).ok
    assert {p.name for p in store.iterdir()} == {*snapshot, "10.88.0.10"}
    assert (store / live_ip).read_bytes() == b"live\r\neth0"
    record("corrupted_store", junk_entries=len(junk) + 3, adds_after=5, overwritten=0)


def _as_nobody(func: Callable[[], int]) -> int:
    """Run func in a forked child with uid/gid 65534; its return value is the exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = func()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_agent_socket_is_root_only_and_survives_bad_clients(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host(agent=True)
    sock_path = host.agent_socket
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    def connect_as_nobody() -> int:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(sock_path))
        except PermissionError:
            return 13
        s.sendall(b"PBQ1" + bytes(16))
        s.settimeout(10)
        return 0 if s.recv(4) == b"" else 3  # closed unserved

    assert _as_nobody(connect_as_nobody) == 13
    # Bad clients: a staller, garbage, a huge claimed length then gone, a half header then gone.
    bad: list[socket.socket] = []
    for payload in (b"PBQ1\x00", os.urandom(4096), b"PBQ1" + bytes(4) + (64).to_bytes(4, "little")
                    + (1 << 20).to_bytes(4, "little") + bytes(4) + b"x", b"PBQ", b"PBQ1" + b"\xff" * 16):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.sendall(payload)
        bad.append(s)
    for s in bad[1:]:
        s.close()
    started = time.monotonic()
    conf = bridge_conf(host)
    pod = host.new_pod()
    reply = host.cni("ADD", conf, pod, "after-bad-clients")
    assert reply.ok, reply.stdout
    assert time.monotonic() - started < 5
    bad[0].close()
    assert host.agent is not None and host.agent.poll() is None


def test_permissions_of_store_log_and_socket(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host(agent=True)
    log = tmp_path / "logs" / "pybridge.log"
    log.parent.mkdir()
    old = os.umask(0)  # the plugin's modes must not depend on the runtime's umask
    try:
        conf = bridge_conf(host, logFile=str(log))
        # Served in-process (no agent at that path), so the umask is the exec'd plugin's.
        reply = host.cni("ADD", conf, host.new_pod(), "c1", env={"PYBRIDGE_AGENT_SOCKET": "/nonexistent"})
    finally:
        os.umask(old)
    assert reply.ok, reply.stdout
    store = host.data_dir / "testnet"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in store.iterdir()}
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert set(modes.values()) == {0o600}, modes
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(host.agent_socket.stat().st_mode) == 0o600
    record("permissions", store_dir=oct(stat.S_IMODE(store.stat().st_mode)),
           store_files=sorted({oct(m) for m in modes.values()}), log=oct(stat.S_IMODE(log.stat().st_mode)),
           socket=oct(stat.S_IMODE(host.agent_socket.stat().st_mode)))
