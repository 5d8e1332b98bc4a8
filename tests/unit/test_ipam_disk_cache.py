"""The agent's parsed-reservation cache must never serve a stale owner."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

from ipam.disk import DiskStore


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_replaced_reservation_file_is_read_again(tmp_path: Path) -> None:
    store = DiskStore(str(tmp_path), "net")
    ip = ipaddress.ip_address("10.1.0.5")
    with store.lock():
        assert store.reserve(ip, "first", "eth0", 0)
    _age(tmp_path / "net" / "10.1.0.5", 60)  # old enough to be cached
    with store.lock():
        assert [(r.container_id, r.ifname) for r in store.reservations()] == [("first", "eth0")]
        store.release(ip)
        assert store.reserve(ip, "second", "eth1", 0)
        assert [(r.container_id, r.ifname) for r in store.reservations()] == [("second", "eth1")]


def test_a_file_written_behind_the_cache_is_seen(tmp_path: Path) -> None:
    store = DiskStore(str(tmp_path), "net")
    with store.lock():
        assert store.reserve(ipaddress.ip_address("10.1.0.5"), "mine", "eth0", 0)
    _age(tmp_path / "net" / "10.1.0.5", 60)
    with store.lock():
        assert len(store.reservations()) == 1
    # Another writer (host-local, an in-process pyipam) replaces and adds files.
    (tmp_path / "net" / "10.1.0.5").unlink()
    (tmp_path / "net" / "10.1.0.5").write_bytes(b"theirs\r\neth9")
    (tmp_path / "net" / "10.1.0.6").write_bytes(b"other\r\neth0")
    with store.lock():
        owners = {str(r.ip): (r.container_id, r.ifname) for r in store.reservations()}
    assert owners == {"10.1.0.5": ("theirs", "eth9"), "10.1.0.6": ("other", "eth0")}
