"""ipam.plugin.allocate against the in-memory store: one IP per range set, all or nothing,
duplicates refused, requested IPs placed in their set; and the store's own contract."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from cnikit.spec.errors import DUPLICATE_ALLOCATION, EXHAUSTED, IP_UNAVAILABLE, CNIError
from ipam.config import IPAMConfig, load_ipam_config
from ipam.plugin import allocate
from ipam.store import Holdings, MemoryStore, Reservation

ip = ipaddress.ip_address

DUAL = [[{"subnet": "10.1.0.0/29"}], [{"subnet": "fd00::/125"}]]


def config(ranges: list[Any] = DUAL, cni_args: dict[str, str] | None = None) -> IPAMConfig:
    netconf = {"cniVersion": "1.1.0", "name": "n", "ipam": {"type": "pyipam", "ranges": ranges}}
    return load_ipam_config(netconf, cni_args or {})


def addresses(store: MemoryStore, cfg: IPAMConfig, cid: str, ifname: str = "eth0") -> list[str]:
    return [str(a) for a, _ in allocate(store, cfg, cid, ifname)]


def test_dual_stack_one_ip_per_set_and_last_reserved() -> None:
    store = MemoryStore()
    assert addresses(store, config(), "c1") == ["10.1.0.2", "fd00::2"]
    assert addresses(store, config(), "c2") == ["10.1.0.3", "fd00::3"]
    assert store.last == {0: ip("10.1.0.3"), 1: ip("fd00::3")}
    assert store.held[ip("fd00::3")] == Reservation(ip("fd00::3"), "c2", "eth0")


def test_round_robin_does_not_reuse_a_released_ip_at_once() -> None:
    store, cfg = MemoryStore(), config()
    addresses(store, cfg, "c1")
    with store.lock():
        store.release_by_id("c1", "eth0")
    assert addresses(store, cfg, "c2")[0] == "10.1.0.3"


def test_later_set_failing_releases_earlier_reservations() -> None:
    store, cfg = MemoryStore(), config()
    for n in range(2, 8):  # fill fd00::/125 (gateway ::1, pool ::2-::7)
        store.held[ip(f"fd00::{n}")] = Reservation(ip(f"fd00::{n}"), "other", "eth0")
    with pytest.raises(CNIError) as exc_info:
        allocate(store, cfg, "c1", "eth0")
    assert exc_info.value.code == EXHAUSTED
    assert "fd00::1-fd00::7" in exc_info.value.msg
    assert ip("10.1.0.2") not in store.held


def test_duplicate_allocation_refused_per_set() -> None:
    store, cfg = MemoryStore(), config()
    addresses(store, cfg, "c1")
    with pytest.raises(CNIError, match="duplicate allocation") as exc_info:
        allocate(store, cfg, "c1", "eth0")
    assert exc_info.value.code == DUPLICATE_ALLOCATION
    assert addresses(store, cfg, "c1", "net1") == ["10.1.0.3", "fd00::3"]  # another ifname is fine
    assert len(store.held) == 4


def test_requested_ips_go_to_their_own_set() -> None:
    store = MemoryStore()
    cfg = config(cni_args={"IP": "fd00::6,10.1.0.5"})
    assert addresses(store, cfg, "c1") == ["10.1.0.5", "fd00::6"]


@pytest.mark.parametrize("requested", ["10.9.9.9", "10.1.0.4,10.1.0.5", "10.1.0.7"])
def test_requested_ip_outside_every_set_or_twice_in_one(requested: str) -> None:
    store = MemoryStore()
    with pytest.raises(CNIError, match="failed to allocate all requested IPs") as exc_info:
        allocate(store, config(cni_args={"IP": requested}), "c1", "eth0")
    assert exc_info.value.code == IP_UNAVAILABLE
    assert store.held == {}


def test_requested_ip_taken() -> None:
    store, cfg = MemoryStore(), config(cni_args={"IP": "10.1.0.2"})
    addresses(store, cfg, "c1")
    with pytest.raises(CNIError, match="not available") as exc_info:
        allocate(store, cfg, "c2", "eth0")
    assert exc_info.value.code == IP_UNAVAILABLE


def test_reserve_taken_behind_our_back_moves_on() -> None:
    class Racy(MemoryStore):
        """reservations() misses one held IP, as if written by a process ignoring the lock."""

        def reservations(self) -> list[Reservation]:
            return [r for r in super().reservations() if r.ip != ip("10.1.0.2")]

    store = Racy()
    store.held[ip("10.1.0.2")] = Reservation(ip("10.1.0.2"), "ghost", "eth0")
    assert addresses(store, config(), "c1")[0] == "10.1.0.3"


def test_store_refuses_use_without_lock_and_nested_lock() -> None:
    store = MemoryStore()
    with pytest.raises(RuntimeError):
        store.reservations()
    with store.lock(), pytest.raises(RuntimeError), store.lock():
        pass


def test_owned_by_prefers_exact_then_legacy() -> None:
    exact = Reservation(ip("10.0.0.2"), "c1", "eth0")
    legacy = Reservation(ip("10.0.0.3"), "c1", None)
    other_if = Reservation(ip("10.0.0.4"), "c1", "eth1")
    assert Holdings([exact, legacy, other_if]).owned_by("c1", "eth0") == [exact.ip]
    assert Holdings([legacy, other_if]).owned_by("c1", "eth0") == [legacy.ip]
    assert Holdings([other_if]).owned_by("c1", "eth0") == []


def test_one_lock_for_the_whole_dual_stack_add() -> None:
    class Counting(MemoryStore):
        entered = 0

        @contextmanager
        def lock(self) -> Iterator[None]:
            self.entered += 1
            with super().lock():
                yield

    store = Counting()
    addresses(store, config(), "c1")
    assert store.entered == 1
