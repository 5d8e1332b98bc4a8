"""One forwarded call as the agent serves it: the request unframed (wire.py), whether the agent
may serve it, and the answer when its attachment stays busy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cnikit import programs, skel
from cnikit.spec import version
from cnikit.spec.errors import TRY_AGAIN_LATER, CNIError

from .. import netns
from . import views, wire


@dataclass(frozen=True)
class Call:
    program: str
    caller_env: dict[str, str]
    env: dict[str, str]  # the caller's, over the agent's defaults
    stdin: bytes
    config: dict[str, Any] | None  # stdin decoded once, here (None: not a JSON object)
    fds: list[int]  # the client's netns, then those the flags name
    pod_fd: int | None
    root_fd: int | None

    @property
    def command(self) -> str:
        return self.env.get("CNI_COMMAND", "")

    @property
    def attachment(self) -> tuple[str, str]:
        """(container id, ifname): calls for one run one at a time."""
        return self.env.get("CNI_CONTAINERID", ""), self.env.get("CNI_IFNAME", "")


def unframe(data: bytes, fds: list[int], defaults: Mapping[str, str]) -> Call:
    """The call a whole request frame and its fds carry; `defaults` fill what the caller's
    environment lacks (the agent's own log file serves calls whose runtime set none)."""
    flags, plen, elen, _slen = wire.decode_request_header(data[:wire.HEADER_LEN])
    body = data[wire.HEADER_LEN:]
    caller_env = wire.decode_env(body[plen:plen + elen])
    pod_fd, root_fd = _passed_fds(flags, fds)
    stdin = body[plen + elen:]
    return Call(program=body[:plen].decode(errors="replace"), caller_env=caller_env,
                env={**defaults, **caller_env}, stdin=stdin, config=_decoded(stdin), fds=fds,
                pod_fd=pod_fd, root_fd=root_fd)


def _decoded(stdin: bytes) -> dict[str, Any] | None:
    """The config every later step reads (views, skel.run, busy); junk is left to the call to
    refuse with the decode error, so decoding it twice costs nothing that matters."""
    try:
        return skel.decode_config(stdin)
    except CNIError:
        return None


def _passed_fds(flags: int, fds: list[int]) -> tuple[int | None, int | None]:
    """(pod netns fd, caller's root directory fd) from what came after the client's netns fd."""
    rest = iter(fds[1:])
    pod_fd = next(rest, None) if flags & wire.FLAG_POD_NETNS else None
    root_fd = next(rest, None) if flags & wire.FLAG_ROOT else None
    return pod_fd, root_fd


def admissible(call: Call) -> bool:
    """The agent does host-side work in its own netns and opens files in its own mount namespace:
    it serves only clients in that netns that see the same files (views.py)."""
    return bool(call.fds) and netns.same_netns(call.fds[0]) and call.program in programs.PROGRAMS \
        and call.root_fd is not None \
        and views.caller_sees_the_same(call.root_fd, call.config, call.caller_env)


def busy(call: Call, waited: float) -> bytes:
    """The answer to a call whose attachment stayed busy for `waited` seconds: try again later."""
    try:
        cni_version = skel.config_version(call.config) if call.config is not None else version.CURRENT
    except CNIError:
        cni_version = version.CURRENT
    container_id, ifname = call.attachment
    error = CNIError(TRY_AGAIN_LATER, "another call on this attachment is still running",
                     f"container {container_id!r}, ifname {ifname!r}: waited {waited:g}s")
    return wire.encode_response(1, error.to_json(cni_version).encode(), b"")
