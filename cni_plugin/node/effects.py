"""The node agent's effects on the host netns it runs in: conflist file, routes, nft masquerade.

Routes the agent owns carry their own routing protocol number (`proto 0x5b` = 91, shown by
`ip route` as "proto 91"), so it removes exactly the routes it made, never the admin's.
Masquerade lives in a table of its own, `inet pybridge_node`, replaced as one nft transaction.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import model

RTPROT_PYBRIDGE = 91
MAIN_TABLE = 254
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_FALLBACK_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> bool:
    """Write `data` to `path` by temp file + rename in the same directory; False if unchanged.

    The temp name ends in neither .conf, .conflist nor .json, so a runtime scanning the
    directory never loads a half-written file.
    """
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        if f.read() == data:
            return False
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _attr(msg: object, name: str) -> object:
    get = getattr(msg, "get_attr", None)
    return get(name) if get else None


def current_routes(ipr: IPRoute) -> set[model.Route]:
    """The routes of the main table this agent installed (by their protocol number)."""
    found = set()
    for family in _FAMILIES:
        for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
            if msg["proto"] != RTPROT_PYBRIDGE:
                continue
            dst, gateway = _attr(msg, "RTA_DST"), _attr(msg, "RTA_GATEWAY")
            if dst is None or gateway is None:
                continue
            found.add(model.Route(f"{dst}/{msg['dst_len']}", str(gateway)))
    return found


def apply_routes(ipr: IPRoute, deletes: Iterable[model.Route], sets: Iterable[model.Route]) -> list[str]:
    """Apply the changes; returns one error text per route that failed (the rest still applies)."""
    errors = []
    for route in sorted(deletes):
        try:
            ipr.route("del", dst=route.dst, gateway=route.gateway, proto=RTPROT_PYBRIDGE, table=MAIN_TABLE)
        except NetlinkError as exc:
            if exc.code != 3:  # ESRCH: already gone
                errors.append(f"del {route.dst} via {route.gateway}: {exc}")
    for route in sorted(sets):
        try:
            ipr.route("replace", dst=route.dst, gateway=route.gateway, proto=RTPROT_PYBRIDGE,
                      table=MAIN_TABLE)
        except NetlinkError as exc:
            errors.append(f"replace {route.dst} via {route.gateway}: {exc}")
    return errors


def uplink_mtu(ipr: IPRoute, addresses: Iterable[model.Address]) -> int | None:
    """MTU of the link holding one of the node's InternalIPs, else of the default route's link."""
    wanted = {str(a) for a in addresses}
    index = None
    for msg in ipr.get_addr():
        if str(_attr(msg, "IFA_ADDRESS")) in wanted or str(_attr(msg, "IFA_LOCAL")) in wanted:
            index = msg["index"]
            break
    if index is None:
        for family in _FAMILIES:
            for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
                if msg["dst_len"] == 0 and _attr(msg, "RTA_OIF"):
                    index = _attr(msg, "RTA_OIF")
                    break
            if index is not None:
                break
    if index is None:
        return None
    links = ipr.get_links(index)
    mtu = _attr(links[0], "IFLA_MTU") if links else None
    return int(mtu) if isinstance(mtu, int) else None


def nft_binary() -> str:
    found = shutil.which("nft") or shutil.which("nft", path=_FALLBACK_PATH)
    if not found:
        raise RuntimeError("nft not found: the node agent masquerades with nftables")
    return found


def apply_masquerade(script: str) -> None:
    proc = subprocess.run([nft_binary(), "-f", "-"], input=script, capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed: {proc.stderr.strip()[:500]}")


class Host:
    """The effects of a Plan on the netns this process is in, skipping what is already in place."""

    def __init__(self, conf_dir: str) -> None:
        self.conf_dir = conf_dir
        self._masq_applied: str | None = None

    def routes(self) -> set[model.Route]:
        with IPRoute() as ipr:
            return current_routes(ipr)

    def mtu(self, node: model.Node | None) -> int | None:
        with IPRoute() as ipr:
            return uplink_mtu(ipr, node.internal_ips if node else ())

    def resync(self) -> None:
        self._masq_applied = None

    def apply(self, plan: model.Plan) -> list[str]:
        """Routes, then masquerade, then the conflist last: the node turns Ready only when
        pods it gets can already reach the other nodes."""
        assert plan.conflist is not None and plan.masquerade is not None
        with IPRoute() as ipr:
            errors = apply_routes(ipr, plan.route_deletes, plan.route_sets)
        if plan.masquerade != self._masq_applied:
            apply_masquerade(plan.masquerade)
            self._masq_applied = plan.masquerade
        write_atomic(os.path.join(self.conf_dir, model.CONFLIST_NAME), model.render_conflist(plan.conflist))
        return errors
