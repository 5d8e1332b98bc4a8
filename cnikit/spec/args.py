"""The CNI_* parameters of one call: a table of what each verb requires, and CNI_ARGS parsing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import INVALID_ENV, INVALID_NETNS, CNIError
from .names import MAX_CONTAINER_ID, validate_container_id

__all__ = ["MAX_CONTAINER_ID", "CmdArgs", "from_env", "parse_cni_args", "validate_container_id",
           "validate_ifname", "validate_netns"]

VERBS = ("ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC")

MAX_IFNAME = 15

# Which variables each verb needs (SPEC "Parameters"; CNI_PATH is optional for us: we only
# need it when IPAM is delegated by exec, and then the lookup names the missing directory).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "STATUS": (),
    "VERSION": (),
    "GC": (),
}


@dataclass(frozen=True)
class CmdArgs:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: tuple[str, ...] = ()
    cni_args: dict[str, str] = field(default_factory=dict)


def validate_ifname(value: str) -> str:
    # The kernel's IFNAMSIZ counts bytes: 9 characters of 'é' are 18.
    bad = (
        len(value.encode(errors="surrogateescape")) > MAX_IFNAME
        or value in (".", "..")
        or any(ch in "/:" or ch.isspace() or ch == "\0" for ch in value)
    )
    if bad:
        raise CNIError(
            INVALID_ENV,
            "invalid CNI_IFNAME",
            f"{value!r}: at most {MAX_IFNAME} bytes, no '/', ':' or whitespace",
        )
    return value


def validate_netns(value: str) -> str:
    if "\0" in value or not value.startswith("/"):
        raise CNIError(INVALID_NETNS, "invalid CNI_NETNS", f"{value!r} is not an absolute path")
    return value


def parse_cni_args(raw: str) -> dict[str, str]:
    """Parse "K1=V1;K2=V2". Unknown keys are kept; callers read only the ones they know, which
    is the IgnoreUnknown behaviour containerd asks for on every call."""
    result: dict[str, str] = {}
    for item in raw.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENV, "invalid CNI_ARGS", f"{item!r} is not KEY=VALUE")
        result[key] = value
    return result


def from_env(env: Mapping[str, str]) -> CmdArgs:
    command = env.get("CNI_COMMAND", "")
    if command not in VERBS:
        raise CNIError(INVALID_ENV, "unknown CNI_COMMAND", f"{command!r}; expected one of {VERBS}")
    missing = [name for name in _REQUIRED[command] if not env.get(name)]
    if missing:
        raise CNIError(INVALID_ENV, "required environment variables missing", ", ".join(missing))
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "DEL", "CHECK"):
        validate_container_id(container_id)
        validate_ifname(ifname)
        if netns:
            validate_netns(netns)
    raw_args = env.get("CNI_ARGS", "")
    return CmdArgs(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=raw_args,
        path=tuple(p for p in env.get("CNI_PATH", "").split(":") if p),
        cni_args=parse_cni_args(raw_args) if command in ("ADD", "DEL", "CHECK") else {},
    )
