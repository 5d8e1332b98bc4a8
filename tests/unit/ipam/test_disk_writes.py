"""How ipam.disk writes: reservation files are made in a temp directory of the network's own
and linked into the store; the last reserved IP is rewritten in place and cut to size."""

from __future__ import annotations

import errno
import ipaddress
import os
from pathlib import Path

import pytest

from ipam import hostlocal
from ipam.disk import DiskStore

ip = ipaddress.ip_address


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(str(tmp_path / "data"), "net1", lock_timeout=1.0)


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_written_aside_and_linked_into_the_store(store: DiskStore, tmp_path: Path) -> None:
    with store.lock():
        assert store.reserve(ip("10.1.0.2"), "cid", "eth0", 0)
    data = tmp_path / "data"
    assert _names(data) == [".pyipam-tmp.net1", "net1"]  # pyipam ls and host-local see net1 only
    assert _names(data / ".pyipam-tmp.net1") == []
    assert _names(data / "net1") == ["10.1.0.2", "last_reserved_ip.0", "lock"]
    assert (data / "net1" / "10.1.0.2").read_bytes() == b"cid\r\neth0"


def test_the_last_reserved_ip_is_cut_to_size(store: DiskStore, tmp_path: Path) -> None:
    with store.lock():
        assert store.reserve(ip("10.1.0.200"), "a", "eth0", 0)
        assert store.reserve(ip("10.1.0.3"), "b", "eth0", 0)
        assert store.last_reserved_ip(0) == ip("10.1.0.3")
    assert (tmp_path / "data" / "net1" / "last_reserved_ip.0").read_bytes() == b"10.1.0.3"


def test_a_killed_writers_temp_file_is_removed(store: DiskStore, tmp_path: Path) -> None:
    with store.lock():
        assert store.reservations() == []
    leftover = tmp_path / "data" / ".pyipam-tmp.net1" / f"{hostlocal.TEMP_PREFIX}123.abcd"
    leftover.write_bytes(b"dead\r\neth0")
    with store.lock():
        assert store.reservations() == []
    assert not leftover.exists()


@pytest.mark.parametrize("plant", ["file", "symlink"])
def test_an_unusable_temp_dir_means_writing_in_the_store(
    store: DiskStore, tmp_path: Path, plant: str
) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    if plant == "file":
        (data / ".pyipam-tmp.net1").write_bytes(b"")
    else:
        (data / ".pyipam-tmp.net1").symlink_to(elsewhere)
    with store.lock():
        assert store.reserve(ip("10.1.0.2"), "cid", "eth0", 0)
    assert (data / "net1" / "10.1.0.2").read_bytes() == b"cid\r\neth0"
    assert _names(elsewhere) == []


def test_a_store_on_another_file_system_is_written_in_place(
    store: DiskStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link

    def link(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int, follow_symlinks: bool) -> None:
        if os.fstat(src_dir_fd).st_ino != os.fstat(dst_dir_fd).st_ino:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "link", link)
    with store.lock():
        assert store.reserve(ip("10.1.0.2"), "cid", "eth0", 0)
        assert not store.reserve(ip("10.1.0.2"), "other", "eth0", 0)
    assert _names(tmp_path / "data" / "net1") == ["10.1.0.2", "last_reserved_ip.0", "lock"]
