"""An ADD's word to the node controller: pod <namespace>/<name> now has these addresses.

The node controller's NetworkPolicy rules isolate every pod address it has not placed yet
(netpol/nft.py, Fence), so a new pod is closed from its first packet. Kubelet posts the pod's IPs
to the API only after the ADD returned; this datagram lets the node controller place the pod (its
labels come from its watch) at once instead. The ADD does not wait for it (docs/networkpolicy.md):
sending never blocks and never fails the ADD. One datagram on a root-only Unix socket; the node
agent reads it as hostile input (read()).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cnikit.ip import IPAddress
from cnikit.spec.args import parse_cni_args
from cnikit.spec.errors import CNIError

SOCKET = "/run/pybridge/netpol.sock"
MAX_DATAGRAM = 1024  # a claim is ~150 bytes; a longer datagram is cut and then refused
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_NAME = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"


def _unscoped(value: object) -> object:
    if isinstance(value, str) and "%" in value:  # a zone means nothing in a rule, and nft refuses it
        raise ValueError("a scoped address (with a %zone) is not allowed")
    return value


_Unscoped = Annotated[IPAddress, BeforeValidator(_unscoped)]


class Claim(BaseModel):
    """Pod namespace/name (as the API validates them) has `ips` (one per family at most)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: Annotated[str, Field(max_length=63, pattern=f"^{_DNS_LABEL}$")]
    name: Annotated[str, Field(max_length=253, pattern=f"^{_NAME}$")]
    ips: Annotated[tuple[_Unscoped, ...], Field(min_length=1, max_length=2)]


def claim_of(env: Mapping[str, str], result: str) -> Claim | None:
    """The claim of a successful ADD: the pod from CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME, as
    kubelet's runtime sets them), its addresses from the result; None outside Kubernetes."""
    try:
        args = parse_cni_args(env.get("CNI_ARGS", ""))
        ips = [str(ip["address"]).split("/")[0] for ip in json.loads(result).get("ips", ())]
        return Claim(namespace=args.get("K8S_POD_NAMESPACE", ""), name=args.get("K8S_POD_NAME", ""),
                     ips=tuple(ips))
    except (CNIError, ValueError, TypeError, KeyError, AttributeError):  # ValidationError is one
        return None


def announce(claim: Claim, path: str = SOCKET) -> bool:
    """Send the claim; False when no node controller listens (policy off, not Kubernetes) or its queue
    is full. Never blocks."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.sendto(claim.model_dump_json().encode(), path)
            return True
    return False


def after_add(env: Mapping[str, str], result: str, path: str = SOCKET) -> bool:
    """Announce a successful ADD's pod, if it is one; whether it was sent."""
    claim = claim_of(env, result)
    return claim is not None and announce(claim, path)


def read(data: bytes) -> Claim:
    """A received datagram; ValueError with the reason when it is not a claim."""
    if len(data) >= MAX_DATAGRAM:
        raise ValueError(f"longer than {MAX_DATAGRAM - 1} bytes")
    try:
        return Claim.model_validate_json(data)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'claim'}: {e['msg']}"
                                   for e in exc.errors())[:300]) from None
