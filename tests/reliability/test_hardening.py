"""Issue 13: what a broken or hostile peer on the node could still do to pybridge, one test each.

Names, stdin encodings, namespaces of the wrong kind, CNI_NETNS_OVERRIDE and log files that
are not pybridge's (the agent socket, the store and the mount-namespace cases have files of
their own)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from testbed.harness import Reply, bridge_conf

from .conftest import HostFactory

BOTH = pytest.mark.parametrize("agent", [False, True], ids=["inprocess", "agent"])


def assert_refused(reply: Reply, code: int, *words: str) -> None:
    assert reply.rc != 0 and reply.out["code"] == code, reply.stdout
    text = f"{reply.out['msg']} {reply.out.get('details', '')}"
    assert all(w in text for w in words), reply.stdout


@BOTH
def test_names_are_measured_in_bytes_as_the_kernel_does(make_host: HostFactory, agent: bool) -> None:
    host = make_host(agent=agent)
    pod = host.new_pod()
    nine = "é" * 9  # 9 characters, 18 bytes: over IFNAMSIZ - 1
    assert_refused(host.cni("ADD", bridge_conf(host), pod, ifname=nine), 4, "CNI_IFNAME")
    assert_refused(host.cni("ADD", bridge_conf(host, bridge=nine), pod), 7, "bridge")
    # Within 15 bytes, non-ASCII names are the kernel's to take: no spec rule against them.
    assert host.cni("ADD", bridge_conf(host, bridge="bré"), pod, ifname="éth0").ok
    assert host.cni("DEL", bridge_conf(host, bridge="bré"), pod, ifname="éth0").ok


@BOTH
def test_stdin_must_be_utf8_without_a_bom(make_host: HostFactory, agent: bool) -> None:
    host = make_host(agent=agent)
    pod = host.new_pod()
    text = json.dumps(bridge_conf(host))
    for what, data in (("bom", b"\xef\xbb\xbf" + text.encode()), ("utf-16", text.encode("utf-16")),
                       ("utf-16-le", text.encode("utf-16-le")), ("utf-32", text.encode("utf-32"))):
        reply = host.cni("ADD", {}, pod, stdin=data)
        assert reply.rc != 0 and reply.out["code"] == 6, (what, reply.stdout)
    assert host.links().keys().isdisjoint({"br-test"})
    assert host.cni("ADD", {}, pod, stdin=text.encode()).ok


@BOTH
def test_a_namespace_of_another_kind_is_not_a_pod_netns(make_host: HostFactory, agent: bool) -> None:
    host = make_host(agent=agent)
    conf = bridge_conf(host)
    for path in ("/proc/self/ns/mnt", "/proc/1/ns/mnt", "/proc/self/ns/pid", "/proc/self/ns/uts"):
        for verb in ("ADD", "DEL"):
            reply = host.cni(verb, conf, netns_path=path)
            assert reply.rc != 0 and reply.out["code"] == 8, (path, verb, reply.stdout)
    assert "br-test" not in host.links()


@BOTH
def test_cni_netns_override_never_lets_del_or_add_touch_a_host_link(
    make_host: HostFactory, agent: bool
) -> None:
    host = make_host(agent=agent)
    conf = bridge_conf(host)
    victim = host.add(conf, host.new_pod(), "victim")
    veth = victim["interfaces"][1]["name"]
    own = f"/run/netns/{host.name}"
    for verb in ("DEL", "ADD"):
        reply = host.cni(verb, conf, netns_path=own, container_id="attacker", ifname=veth,
                         env={"CNI_NETNS_OVERRIDE": "1"})
        assert_refused(reply, 8, "own network namespace")
    assert veth in host.links()
    assert "victim" in "".join(host.reservations("testnet").values())


def _copy_owned(src: str, dst: Path, mode: int, uid: int = 0) -> bytes:
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    os.chown(dst, uid, uid)
    return dst.read_bytes()


def test_log_file_is_only_a_new_file_or_one_pybridge_made(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host()
    conf = bridge_conf(host)
    status = lambda log: host.cni("STATUS", {**conf, "logFile": str(log)})  # noqa: E731
    foreign: dict[Path, bytes] = {
        tmp_path / "passwd": _copy_owned("/etc/passwd", tmp_path / "passwd", 0o644),
        tmp_path / "key": _copy_owned("/etc/hostname", tmp_path / "key", 0o600),  # 0600 root, no JSON
        tmp_path / "nobody.log": _copy_owned("/dev/null", tmp_path / "nobody.log", 0o600, 65534),
    }
    loose = tmp_path / "loose.log"
    loose.write_text('{"event": "old"}\n')
    loose.chmod(0o644)
    foreign[loose] = loose.read_bytes()
    for path, before in foreign.items():
        assert_refused(status(path), 7, "logFile", str(path))
        assert path.read_bytes() == before, path
    made = tmp_path / "pybridge.log"
    assert status(made).ok
    assert status(made).ok  # a later call appends to the log pybridge made
    lines = [json.loads(line) for line in made.read_text().splitlines()]
    assert len(lines) == 2 and made.stat().st_mode & 0o777 == 0o600

