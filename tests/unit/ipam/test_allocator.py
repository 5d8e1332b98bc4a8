"""ipam.allocator: round robin from the last reserved IP, wrap-around, gateways, exhaustion and
requested IPs, with no store at all."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnikit.ip import IPAddress
from cnikit.spec.errors import EXHAUSTED, IP_UNAVAILABLE, CNIError
from ipam.allocator import candidates, pick, range_for
from ipam.config import Range, RangeSet

ip = ipaddress.ip_address


def rng(subnet: str, **fields: Any) -> Range:
    return Range.model_validate({"subnet": subnet, **fields})


# Two ranges of one set: .2-.4 of a /29 (gateway .1) and .9-.11 of the next /29 with its
# gateway .10 in the middle of its pool.
TWO: RangeSet = (
    rng("10.0.0.0/29", rangeStart="10.0.0.2", rangeEnd="10.0.0.4"),
    rng("10.0.0.8/29", rangeStart="10.0.0.9", rangeEnd="10.0.0.11", gateway="10.0.0.10"),
)


def order(range_set: RangeSet, last: str | None) -> list[str]:
    return [str(a) for a, _ in candidates(range_set, ip(last) if last else None)]


def test_starts_at_range_start_without_history() -> None:
    assert order(TWO, None) == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9", "10.0.0.11"]


def test_starts_after_last_reserved() -> None:
    assert order(TWO, "10.0.0.3") == ["10.0.0.4", "10.0.0.9", "10.0.0.11", "10.0.0.2", "10.0.0.3"]


def test_wraps_from_last_range_end_to_first_start() -> None:
    assert order(TWO, "10.0.0.11") == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9", "10.0.0.11"]


def test_moves_to_next_range_after_a_range_end() -> None:
    assert order(TWO, "10.0.0.4") == ["10.0.0.9", "10.0.0.11", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


@pytest.mark.parametrize("last", ["10.0.0.7", "10.0.0.1", "192.168.0.1", "fd00::1"])
def test_last_outside_the_set_restarts_at_first_range(last: str) -> None:
    assert order(TWO, last)[0] == "10.0.0.2"


def test_default_range_skips_gateway_and_broadcast() -> None:
    got = order((rng("10.1.0.0/29"),), None)
    assert got == ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]


def test_ipv6_range_runs_to_last_address() -> None:
    got = order((rng("fd00::/126"),), None)
    assert got == ["fd00::2", "fd00::3"]


def test_pick_skips_reserved_round_robin() -> None:
    got, r = pick(TWO, {ip("10.0.0.4"), ip("10.0.0.9")}, ip("10.0.0.3"))
    assert (got, r) == (ip("10.0.0.11"), TWO[1])


def test_exhausted_names_the_range_set() -> None:
    everything = {a for a, _ in candidates(TWO, None)}
    with pytest.raises(CNIError) as exc_info:
        pick(TWO, everything, ip("10.0.0.3"))
    assert exc_info.value.code == EXHAUSTED
    assert exc_info.value.msg == (
        "no IP addresses available in range set: 10.0.0.2-10.0.0.4,10.0.0.9-10.0.0.11 "
        "(10.0.0.0/29,10.0.0.8/29: 5 of 5 in use)")


def test_requested_ip() -> None:
    assert pick(TWO, {ip("10.0.0.2")}, None, ip("10.0.0.9")) == (ip("10.0.0.9"), TWO[1])


@pytest.mark.parametrize(
    ("requested", "reserved", "message"),
    [
        ("10.0.0.5", set(), "is not in range set"),
        ("fd00::5", set(), "is not in range set"),
        ("10.0.0.10", set(), "is the gateway"),
        ("10.0.0.3", {ip("10.0.0.3")}, "is not available"),
    ],
)
def test_requested_ip_refused(requested: str, reserved: set[IPAddress], message: str) -> None:
    with pytest.raises(CNIError, match=message) as exc_info:
        pick(TWO, reserved, None, ip(requested))
    assert exc_info.value.code == IP_UNAVAILABLE


def test_range_for() -> None:
    assert range_for(TWO, ip("10.0.0.11")) is TWO[1]
    assert range_for(TWO, ip("10.0.0.8")) is None  # in the subnet, outside the pool


@given(st.one_of(st.none(), st.integers(0, 20).map(lambda n: ip(f"10.0.0.{n}"))))
def test_full_cycle_visits_every_allocatable_ip_once(last: IPAddress | None) -> None:
    got = [a for a, _ in candidates(TWO, last)]
    assert sorted(got) == [ip(a) for a in ("10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9", "10.0.0.11")]
    if last in got:
        assert got[-1] == last  # the last reserved IP is the last one tried again
