"""Address selection for one range set, as host-local's allocator.go does it. Pure: the caller
passes in what is reserved and the last reserved IP, and does the reserving itself.

Round robin: the search starts just after the last IP reserved in this range set, so a
crash-looping container does not get the same IP back until the whole set has been used.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

from cnikit.ip import IPAddress
from cnikit.spec.errors import EXHAUSTED, IP_UNAVAILABLE, CNIError

from .config import Range, RangeSet, describe, subnets


def range_for(range_set: RangeSet, ip: IPAddress) -> Range | None:
    return next((r for r in range_set if r.contains(ip)), None)


def _addresses(r: Range, first: int, last: int) -> Iterator[tuple[IPAddress, Range]]:
    make = type(r.range_start)
    for value in range(first, last + 1):
        ip = make(value)
        if ip != r.gateway:
            yield ip, r


def candidates(
    range_set: RangeSet, last_reserved: IPAddress | None
) -> Iterator[tuple[IPAddress, Range]]:
    """Every allocatable IP of the set exactly once, starting after `last_reserved` if it is
    still inside the set, else at the first range's start; wraps across ranges."""
    count = len(range_set)
    index, first = 0, int(range_set[0].range_start)
    if last_reserved is not None:
        for i, r in enumerate(range_set):
            if r.contains(last_reserved):
                index, first = i, int(last_reserved) + 1
                if last_reserved == r.range_end:
                    index = (i + 1) % count
                    first = int(range_set[index].range_start)
                break
    head = range_set[index]
    yield from _addresses(head, first, int(head.range_end))
    for step in range(1, count):
        r = range_set[(index + step) % count]
        yield from _addresses(r, int(r.range_start), int(r.range_end))
    yield from _addresses(head, int(head.range_start), first - 1)


def pick(
    range_set: RangeSet,
    reserved: Container[IPAddress],
    last_reserved: IPAddress | None,
    requested: IPAddress | None = None,
) -> tuple[IPAddress, Range]:
    """The IP to reserve next in this set and the range it belongs to."""
    if requested is None:
        size = 0
        for ip, r in candidates(range_set, last_reserved):
            if ip not in reserved:
                return ip, r
            size += 1
        # host-local's words first (tools match them), then what an operator needs: how big.
        raise CNIError(EXHAUSTED, f"no IP addresses available in range set: {describe(range_set)} "
                                  f"({subnets(range_set)}: {size} of {size} in use)")
    found = range_for(range_set, requested)
    if found is None:
        raise CNIError(
            IP_UNAVAILABLE,
            f"requested IP address {requested} is not in range set {describe(range_set)}",
        )
    if requested == found.gateway:
        raise CNIError(
            IP_UNAVAILABLE, f"requested IP address {requested} is the gateway of range {found}"
        )
    if requested in reserved:
        raise CNIError(
            IP_UNAVAILABLE,
            f"requested IP address {requested} is not available in range set {describe(range_set)}",
        )
    return requested, found
