"""The node controller's effects on the host netns it runs in: conflist file, routes, nft masquerade.

Routes the agent owns carry their own routing protocol number (`proto 0x5b` = 91, shown by
`ip route` as "proto 91"), so it removes exactly the routes it made, never the admin's.
Masquerade lives in a table of its own, `inet pybridge_node`, replaced as one nft transaction.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from .. import files, nft, rtnl
from ..netlink import Netlink, NetlinkError
from . import model

RTPROT_PYBRIDGE = 91


def current_routes(sock: Netlink) -> set[model.Route]:
    """The routes of the main table this agent installed (by their protocol number), default
    routes included: whatever it ever installed, it can find and remove."""
    return {model.Route(dst, gateway) for dst, gateway, proto in sock.main_routes()
            if proto == RTPROT_PYBRIDGE and gateway is not None}


def foreign_destinations(sock: Netlink) -> set[str]:
    """The destinations of the main table's routes this agent did not install."""
    return {dst for dst, _gateway, proto in sock.main_routes() if proto != RTPROT_PYBRIDGE}


def apply_routes(sock: Netlink, deletes: Iterable[model.Route], sets: Iterable[model.Route],
                 owned: Iterable[model.Route] = ()) -> list[str]:
    """Apply the changes; returns one error text per route that failed (the rest still applies).
    Only a destination in `owned` (the agent's routes now) is replaced; any other is added, which
    the kernel refuses if a route appeared there meanwhile: the agent never overwrites one."""
    errors = []
    ours = {r.dst for r in owned}
    for route in sorted(deletes):
        try:
            sock.delete_route(route.dst, route.gateway, RTPROT_PYBRIDGE)
        except NetlinkError as exc:
            if exc.errno != errno.ESRCH:  # already gone
                errors.append(f"del {route.dst} via {route.gateway}: {exc.strerror}")
    for route in sorted(sets):
        replace = route.dst in ours
        try:
            sock.set_route(route.dst, route.gateway, RTPROT_PYBRIDGE, replace=replace)
        except NetlinkError as exc:
            verb = "replace" if replace else "add"
            errors.append(f"{verb} {route.dst} via {route.gateway}: {exc.strerror}")
    return errors


class NodeEffects:
    """The effects of a Desired state on the netns this process is in, skipping what is already in place."""

    def __init__(self, conf_dir: str) -> None:
        self.conf_dir = conf_dir
        self._masq_applied: str | None = None

    def routes(self) -> set[model.Route]:
        with rtnl.Socket() as sock:
            return current_routes(sock)

    def foreign_routes(self) -> set[str]:
        with rtnl.Socket() as sock:
            return foreign_destinations(sock)

    def mtu(self, node: model.Node | None) -> int | None:
        with rtnl.Socket() as sock:
            return sock.uplink_mtu(str(a) for a in (node.internal_ips if node else ()))

    def resync(self) -> None:
        self._masq_applied = None

    def apply(self, desired: model.Desired) -> list[str]:
        """Routes, then masquerade, then the conflist last: the node turns Ready only when
        pods it gets can already reach the other nodes. A failed masquerade is an error (the
        caller retries), and the conflist waits for it."""
        assert desired.conflist is not None and desired.masquerade is not None
        with rtnl.Socket() as sock:
            errors = apply_routes(sock, desired.route_deletes, desired.route_sets, current_routes(sock))
        if desired.masquerade != self._masq_applied:
            try:
                # exec'd: nft.py says why the node controller never runs it in-process
                nft.run(desired.masquerade)
            except nft.NftError as exc:
                return [*errors, f"masquerade: {exc}"]
            self._masq_applied = desired.masquerade
        conflist = os.path.join(self.conf_dir, model.CONFLIST_NAME)
        files.write_bytes(conflist, model.render_conflist(desired.conflist))
        return errors
