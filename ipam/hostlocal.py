"""host-local's store format (backend/disk), byte for byte, so pyipam and host-local can share a
data directory: in `<dataDir>/<network>/`, one file per reserved IP, named by the IP, holding
`<containerID>\\r\\n<ifname>`; `last_reserved_ip.<rangeset index>`; and `lock`, the flock target.
"""

from __future__ import annotations

from cnikit.ip import IPAddress, parse_ip
from cnikit.spec.args import validate_container_id, validate_ifname
from cnikit.spec.errors import CNIError

LOCK_FILE = "lock"
LAST_RESERVED_PREFIX = "last_reserved_ip."
SEPARATOR = "\r\n"
MAX_CONTENT = 1024
# pyipam's own names: STATUS's write test, and reservations being written (disk.py).
STATUS_PROBE = "status.probe"
TEMP_PREFIX = ".pyipam-tmp."


def last_reserved_name(rangeset_idx: int) -> str:
    return f"{LAST_RESERVED_PREFIX}{rangeset_idx}"


def is_bookkeeping(name: str) -> bool:
    """A name of the store that is neither a reservation nor a stray file."""
    return name in (LOCK_FILE, STATUS_PROBE) or name.startswith(LAST_RESERVED_PREFIX)


def reservation_content(container_id: str, ifname: str) -> bytes:
    return f"{container_id}{SEPARATOR}{ifname}".encode()


def ip_named(name: str) -> IPAddress | None:
    """The IP a file name stands for; only canonical spellings, as host-local writes them."""
    try:
        ip = parse_ip(name)
    except ValueError:
        return None
    return ip if str(ip) == name else None


def owner(data: bytes) -> tuple[str, str | None] | None:
    """(container id, ifname or None for a legacy id-only file) of a reservation file's bytes."""
    try:
        container_id, sep, ifname = data.decode("utf-8").strip().partition(SEPARATOR)
        validate_container_id(container_id)
        if sep:
            validate_ifname(ifname)
    except (UnicodeDecodeError, CNIError):
        return None
    return container_id, ifname if sep else None


def last_reserved_ip(data: bytes) -> IPAddress | None:
    try:
        return parse_ip(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
