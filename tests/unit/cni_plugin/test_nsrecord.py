"""pybridge's own record of an attachment's netns path: where it lives, and that a hostile one
counts as no record (the collector then keeps the attachment)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cni_plugin import nsrecord
from cnikit.spec.errors import CNIError

NETNS = "/var/run/netns/cni-1234"


def test_a_record_round_trips_and_goes(tmp_path: Path) -> None:
    nsrecord.write(str(tmp_path), "net", "c1", "eth0", NETNS)
    assert nsrecord.read(str(tmp_path), "net", "c1", "eth0") == NETNS
    assert nsrecord.read(str(tmp_path), "net", "c1", "eth1") is None
    # Beside the store, in a directory no network can be named (host-local reads <dataDir>/<network>/).
    assert os.listdir(tmp_path) == [".pybridge-netns"]
    assert os.listdir(tmp_path / ".pybridge-netns" / "net") == ["c1:eth0"]
    nsrecord.remove(str(tmp_path), "net", "c1", "eth0")
    nsrecord.remove(str(tmp_path), "net", "c1", "eth0")  # twice: DEL is idempotent
    assert nsrecord.read(str(tmp_path), "net", "c1", "eth0") is None


def test_a_network_name_that_would_leave_the_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as exc:
        nsrecord.write(str(tmp_path), "../escape", "c1", "eth0", NETNS)
    assert exc.value.code == 7 and "name" in exc.value.msg
    assert nsrecord.read(str(tmp_path), "../escape", "c1", "eth0") is None


def test_a_record_that_cannot_be_written_fails_the_add_clearly(tmp_path: Path) -> None:
    (tmp_path / ".pybridge-netns").write_text("")  # a file where the directory should be
    with pytest.raises(CNIError) as exc:
        nsrecord.write(str(tmp_path), "net", "c1", "eth0", NETNS)
    assert exc.value.code == 999 and exc.value.msg == "failed to record the netns path"


@pytest.mark.parametrize("netns", [
    NETNS, "/run/netns/x", "/proc/123/ns/net", "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/a/netns",
])
def test_plausible_netns_paths(netns: str) -> None:
    assert nsrecord.plausible(netns)


@pytest.mark.parametrize("netns", [
    "", "netns/x", "/etc/passwd", "/run", "/run/", "/run/../etc/x", "/run//x", "/run/x/", "/runx/y",
    "/run/x\0y", "/tmp/x",
])
def test_implausible_netns_paths(netns: str) -> None:
    assert not nsrecord.plausible(netns)


def test_the_roots_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nsrecord.ROOTS_ENV, "/tmp/node:relative")
    assert nsrecord.roots() == ("/tmp/node",)
    assert nsrecord.plausible("/tmp/node/netns/x") and not nsrecord.plausible(NETNS)


def _record(tmp_path: Path) -> Path:
    path = Path(nsrecord.path(str(tmp_path), "net", "c1", "eth0"))
    path.parent.mkdir(parents=True)
    return path


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text(NETNS)
    _record(tmp_path).symlink_to(tmp_path / "elsewhere")
    assert nsrecord.read(str(tmp_path), "net", "c1", "eth0") is None


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    os.mkfifo(_record(tmp_path))  # would block a plain open
    assert nsrecord.read(str(tmp_path), "net", "c1", "eth0") is None


@pytest.mark.parametrize("content", [b"/run/" + b"a" * nsrecord.MAX_BYTES, b"\xff\xfe", b"/etc/shadow"])
def test_an_oversized_undecodable_or_implausible_record_is_none(tmp_path: Path, content: bytes) -> None:
    _record(tmp_path).write_bytes(content)
    assert nsrecord.read(str(tmp_path), "net", "c1", "eth0") is None


@pytest.mark.parametrize("ipam, expected", [
    ({"type": "pyipam"}, "/var/lib/cni/networks"),
    ({"type": "host-local", "dataDir": "/srv/ipam"}, "/srv/ipam"),
    ({"type": "host-local", "dataDir": "/srv/../etc"}, None),
    ({"type": "host-local", "dataDir": "relative"}, None),
    ({"type": "dhcp"}, None),
])
def test_data_dir(ipam: dict[str, object], expected: str | None) -> None:
    assert nsrecord.data_dir(ipam) == expected


def test_the_default_data_dir_is_the_ipam_plugins() -> None:
    from ipam.config import DEFAULT_DATA_DIR

    assert nsrecord.DEFAULT_DATA_DIR == DEFAULT_DATA_DIR


def test_nothing_is_made_while_the_data_dir_does_not_exist(tmp_path: Path) -> None:
    """The IPAM plugin makes the data dir, with its checks (owner, mode), not the record."""
    store = str(tmp_path / "store")
    assert not nsrecord.write(store, "net", "c1", "eth0", "/run/netns/x")
    assert not os.path.exists(store)
    os.mkdir(store)
    assert nsrecord.write(store, "net", "c1", "eth0", "/run/netns/x")
    assert nsrecord.read(store, "net", "c1", "eth0") == "/run/netns/x"


def test_orphans_are_unreserved_records_of_gone_netns_old_enough(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nsrecord.ROOTS_ENV, str(tmp_path / "ns"))
    (tmp_path / "ns").mkdir()
    (tmp_path / "ns" / "alive").write_text("")
    store = str(tmp_path / "store")
    os.mkdir(store)
    for cid, netns in (("c-gone", "gone"), ("c-reserved", "gone"), ("c-alive", "alive")):
        nsrecord.write(store, "net", cid, "eth0", str(tmp_path / "ns" / netns))
    assert nsrecord.orphans(store, "net", {("c-reserved", "eth0")}, 0) == ["c-gone:eth0"]
    assert nsrecord.orphans(store, "net", set(), 60) == []  # an ADD may still be making it
    assert nsrecord.orphans(store, "other", set(), 0) == []
