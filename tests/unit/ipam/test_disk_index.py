"""The agent's index of a store directory: it reads only what changed, and never serves a stale
owner whoever changed the directory."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest

from ipam import index
from ipam.disk import DiskStore
from ipam.index import Indexes


def _owners(store: DiskStore) -> dict[str, tuple[str, str | None]]:
    with store.lock():
        return {str(r.ip): (r.container_id, r.ifname) for r in store.reservations()}


def _reads(store: DiskStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    read: list[str] = []
    real = store._read

    def counting(name: str) -> bytes | None:
        read.append(name)
        return real(name)

    monkeypatch.setattr(store, "_read", counting)
    return read


def test_an_unchanged_store_is_not_read_again(
    tmp_path: Path, ipam_indexes: Indexes, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(str(tmp_path), "net", indexes=ipam_indexes)
    with store.lock():
        for n in range(2, 52):
            assert store.reserve(ipaddress.ip_address(f"10.1.0.{n}"), f"c{n}", "eth0", 0)
    read = _reads(store, monkeypatch)
    assert len(_owners(store)) == 50
    assert len(read) == 50  # the first look reads everything
    read.clear()
    with store.lock():
        assert store.reserve(ipaddress.ip_address("10.1.0.60"), "new", "eth0", 0)
        assert len(store.reservations()) == 51
        store.release(ipaddress.ip_address("10.1.0.2"))
        assert len(store.reservations()) == 50
    assert read == ["10.1.0.60"]


def test_a_replaced_reservation_file_is_read_again(tmp_path: Path, ipam_indexes: Indexes) -> None:
    store = DiskStore(str(tmp_path), "net", indexes=ipam_indexes)
    ip = ipaddress.ip_address("10.1.0.5")
    with store.lock():
        assert store.reserve(ip, "first", "eth0", 0)
        assert [(r.container_id, r.ifname) for r in store.reservations()] == [("first", "eth0")]
        store.release(ip)
        assert store.reserve(ip, "second", "eth1", 0)
        assert [(r.container_id, r.ifname) for r in store.reservations()] == [("second", "eth1")]


def test_files_written_behind_the_index_are_seen(tmp_path: Path, ipam_indexes: Indexes) -> None:
    store = DiskStore(str(tmp_path), "net", indexes=ipam_indexes)
    with store.lock():
        assert store.reserve(ipaddress.ip_address("10.1.0.5"), "mine", "eth0", 0)
        assert store.reserve(ipaddress.ip_address("10.1.0.7"), "gone", "eth0", 0)
    assert len(_owners(store)) == 2
    # Another writer (host-local, a one-shot pyipam) replaces, rewrites, adds and removes files,
    # within the same clock tick as the index's last look.
    net = tmp_path / "net"
    (net / "10.1.0.5").unlink()
    (net / "10.1.0.5").write_bytes(b"theirs\r\neth9")
    (net / "10.1.0.6").write_bytes(b"other\r\neth0")
    (net / "10.1.0.7").unlink()
    (net / "10.1.0.8").write_bytes(b"")  # host-local killed between create and write
    with (net / "10.1.0.8").open("wb") as f:
        f.write(b"late\r\neth1")  # ... and a file rewritten in place
    assert _owners(store) == {"10.1.0.5": ("theirs", "eth9"), "10.1.0.6": ("other", "eth0"),
                              "10.1.0.8": ("late", "eth1")}


def test_a_replaced_directory_is_read_whole(tmp_path: Path, ipam_indexes: Indexes) -> None:
    store = DiskStore(str(tmp_path), "net", indexes=ipam_indexes)
    with store.lock():
        assert store.reserve(ipaddress.ip_address("10.1.0.5"), "old", "eth0", 0)
    assert len(_owners(store)) == 1
    shutil.rmtree(tmp_path / "net")
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "10.1.0.9").write_bytes(b"new\r\neth0")
    assert _owners(store) == {"10.1.0.9": ("new", "eth0")}


def test_lost_events_mean_a_whole_read(
    tmp_path: Path, ipam_indexes: Indexes, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(str(tmp_path), "net", indexes=ipam_indexes)
    assert _owners(store) == {}
    (tmp_path / "net" / "10.1.0.3").write_bytes(b"c\r\neth0")
    kept = ipam_indexes.of(store.path)
    assert kept is not None
    monkeypatch.setattr(kept.watch, "changed", lambda: None)  # as after IN_Q_OVERFLOW
    assert _owners(store) == {"10.1.0.3": ("c", "eth0")}


def test_without_inotify_the_store_is_read_whole(
    tmp_path: Path, ipam_indexes: Indexes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify(self: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(index.Index, "__init__", no_inotify)
    store = DiskStore(str(tmp_path), "net", indexes=ipam_indexes)
    assert _owners(store) == {}
    (tmp_path / "net" / "10.1.0.3").write_bytes(b"c\r\neth0")
    assert _owners(store) == {"10.1.0.3": ("c", "eth0")}


def test_a_store_without_indexes_reads_every_name_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(str(tmp_path), "net")  # as in a one-shot call
    with store.lock():
        for n in range(2, 12):
            assert store.reserve(ipaddress.ip_address(f"10.1.0.{n}"), f"c{n}", "eth0", 0)
    read = _reads(store, monkeypatch)
    assert len(_owners(store)) == 10
    assert len(_owners(store)) == 10
    assert len(read) == 20
