"""Turn a pydantic ValidationError into the spec error naming the field (code 7); the one
capability filter of runtimeConfig."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .errors import INVALID_CONFIG, CNIError


def field_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def config_error(exc: ValidationError, prefix: str = "") -> CNIError:
    first = exc.errors(include_url=False)[0]
    path = field_path(tuple(first["loc"]), prefix)
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = repr(value)[:80] if value is not None and not isinstance(value, dict) else ""
    details = f"{msg} (got {shown})" if shown else msg
    title = f"invalid field '{path}'" if path else "invalid network configuration"
    return CNIError(INVALID_CONFIG, title, details)


def declared_runtime_config(netconf: Mapping[str, Any]) -> Any:
    """The runtimeConfig keys the network declared as capabilities. libcni strips `capabilities`
    before calling a plugin, so when it is absent the runtime has already filtered."""
    raw = netconf.get("runtimeConfig")
    caps = netconf.get("capabilities")
    if not isinstance(raw, dict) or caps is None:
        return raw  # the caller's model reports a runtimeConfig that is no object
    if not isinstance(caps, dict):
        raise CNIError(INVALID_CONFIG, "invalid field 'capabilities'", "an object is required")
    return {key: value for key, value in raw.items() if caps.get(key) is True}

