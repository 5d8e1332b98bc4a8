"""ipam.disk: host-local's byte format and modes, the bounded flock, and a store directory
holding junk or symlinks."""

from __future__ import annotations

import fcntl
import ipaddress
import multiprocessing
import os
import stat
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from cnikit.spec.errors import IO_FAILURE, TRY_AGAIN_LATER, CNIError
from ipam.disk import DiskStore
from ipam.store import Reservation

ip = ipaddress.ip_address


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def store(tmp_path: Path, warnings: list[str]) -> DiskStore:
    return DiskStore(str(tmp_path / "data"), "net1", lock_timeout=1.0, warn=warnings.append)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_byte_format_and_modes(store: DiskStore, tmp_path: Path) -> None:
    with store.lock():
        assert store.reserve(ip("10.1.0.2"), "cid", "eth0", 0)
        assert store.reserve(ip("fd00::5"), "cid", "eth0", 1)
    net = tmp_path / "data" / "net1"
    assert sorted(p.name for p in net.iterdir()) == [
        "10.1.0.2", "fd00::5", "last_reserved_ip.0", "last_reserved_ip.1", "lock"]
    assert (net / "10.1.0.2").read_bytes() == b"cid\r\neth0"
    assert (net / "last_reserved_ip.0").read_bytes() == b"10.1.0.2"
    assert (net / "last_reserved_ip.1").read_bytes() == b"fd00::5"
    assert mode(net / "10.1.0.2") == mode(net / "last_reserved_ip.0") == 0o600
    assert mode(net) == 0o700
    assert mode(tmp_path / "data") == 0o755


def test_reserve_is_exclusive_and_lookup_round_trips(store: DiskStore) -> None:
    with store.lock():
        assert store.reserve(ip("10.1.0.2"), "cid", "eth0", 0)
        assert not store.reserve(ip("10.1.0.2"), "other", "eth0", 0)
        assert store.last_reserved_ip(0) == ip("10.1.0.2")
        assert store.last_reserved_ip(1) is None
        assert store.reservations() == [Reservation(ip("10.1.0.2"), "cid", "eth0")]
        assert store.get_by_id("cid", "eth0") == [ip("10.1.0.2")]
        assert store.get_by_id("cid", "eth1") == []


def test_host_local_files_are_read(store: DiskStore, tmp_path: Path) -> None:
    with store.lock():
        net = tmp_path / "data" / "net1"
        (net / "10.1.0.3").write_bytes(b"cid\r\neth0\n")  # host-local trims whitespace
        (net / "10.1.0.4").write_bytes(b"legacy-id")
        assert store.reservations() == [
            Reservation(ip("10.1.0.3"), "cid", "eth0"), Reservation(ip("10.1.0.4"), "legacy-id", None)]


def test_release_exact_then_legacy_fallback(store: DiskStore, tmp_path: Path) -> None:
    net = tmp_path / "data" / "net1"
    with store.lock():
        store.reserve(ip("10.1.0.2"), "c1", "eth0", 0)
        store.reserve(ip("10.1.0.3"), "c1", "eth1", 0)
        (net / "10.1.0.4").write_bytes(b"c1")
        assert store.release_by_id("c1", "eth0") == [ip("10.1.0.2")]
        assert sorted(p.name for p in net.glob("10.*")) == ["10.1.0.3", "10.1.0.4"]
        assert store.release_by_id("c1", "eth0") == [ip("10.1.0.4")]  # now only legacy matches
        assert store.release_by_id("c1", "eth0") == []
        store.release(ip("10.1.0.99"))  # releasing a free IP is fine
        assert [r.ip for r in store.reservations()] == [ip("10.1.0.3")]


def test_junk_in_the_store_is_skipped_and_reported(
    store: DiskStore, tmp_path: Path, warnings: list[str]
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"victim\r\neth0")
    with store.lock():
        net = tmp_path / "data" / "net1"
        store.reserve(ip("10.1.0.2"), "good", "eth0", 0)
        (net / "notes.txt").write_text("hello")
        (net / "10.1.0.10").write_bytes(b"\xff\xfe\x00")
        (net / "10.1.0.11").write_bytes(b"a\r\nb\r\nc")
        (net / "10.1.0.12").write_bytes(b"")
        (net / "10.1.0.13").write_bytes(b"x" * 5000)
        (net / "10.1.0.14").write_bytes(b"../../etc\r\neth0")
        (net / "10.1.0.15").mkdir()
        (net / "10.1.0.16").symlink_to(outside)
        os.mkfifo(net / "10.1.0.17")  # must not block the reader
        (net / "fd00:0::1").write_bytes(b"c\r\neth0")  # not how host-local spells an IP
        (net / "last_reserved_ip.0").write_bytes(b"not an ip")
        assert store.reservations() == [Reservation(ip("10.1.0.2"), "good", "eth0")]
        assert store.last_reserved_ip(0) is None
    skipped = {w.removeprefix(f"{net}/").rsplit(": ", 1)[0] for w in warnings if "skipped" in w}
    assert skipped == {"notes.txt", "fd00:0::1"} | {f"10.1.0.{n}" for n in range(10, 18)}
    assert any("last_reserved_ip.0" in w for w in warnings)


def test_symlinks_are_never_followed(store: DiskStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    net = tmp_path / "data" / "net1"
    with store.lock():
        (net / "10.1.0.2").symlink_to(outside)
        assert not store.reserve(ip("10.1.0.2"), "cid", "eth0", 0)
        (net / "last_reserved_ip.0").symlink_to(outside)
        with pytest.raises(CNIError) as exc_info:
            store.reserve(ip("10.1.0.3"), "cid", "eth0", 0)
        assert exc_info.value.code == IO_FAILURE
        assert not (net / "10.1.0.3").exists()  # the half-made reservation was undone
        assert store.last_reserved_ip(0) is None
    assert outside.read_bytes() == b"untouched"


def test_network_dir_symlink_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "net1").symlink_to(elsewhere)
    store = DiskStore(str(tmp_path / "data"), "net1")
    with pytest.raises(CNIError) as exc_info, store.lock():
        pass
    assert exc_info.value.code == IO_FAILURE
    assert list(elsewhere.iterdir()) == []


def test_use_without_lock_is_a_bug(store: DiskStore) -> None:
    with pytest.raises(RuntimeError):
        store.reservations()


def _hold_lock(path: str, locked: Event, release: Event) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    locked.set()
    release.wait(30)


def test_lock_held_by_another_process_times_out_with_try_again(tmp_path: Path) -> None:
    store = DiskStore(str(tmp_path), "net1", lock_timeout=0.3)
    (tmp_path / "net1").mkdir()
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "net1" / "lock"), locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        with pytest.raises(CNIError) as exc_info, store.lock():
            pass
        elapsed = time.monotonic() - started
        assert exc_info.value.code == TRY_AGAIN_LATER
        assert exc_info.value.msg == "timed out waiting for the IPAM store lock"
        assert str(tmp_path / "net1") in exc_info.value.details
        assert 0.3 <= elapsed < 2.0
    finally:
        release.set()
        holder.join(10)
    with store.lock():  # free again once the holder exits
        assert store.reservations() == []
