"""GC's list of attachments that are still valid (SPEC "GC")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import INVALID_CONFIG, CNIError

_GC_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")


def valid_attachments(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    key = next((k for k in _GC_KEYS if config.get(k) is not None), None)
    if key is None:
        return set()
    raw = config[key]
    if not isinstance(raw, list):
        raise CNIError(INVALID_CONFIG, f"invalid field '{key}'", "a list is required")
    valid: set[tuple[str, str]] = set()
    for i, item in enumerate(raw):
        match item:
            case {"containerID": str() as container_id, "ifname": str() as ifname}:
                valid.add((container_id, ifname))
            case _:
                raise CNIError(
                    INVALID_CONFIG,
                    f"invalid field '{key}[{i}]'",
                    'an object {"containerID": string, "ifname": string} is required',
                )
    return valid
