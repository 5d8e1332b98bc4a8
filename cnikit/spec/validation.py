"""Turn a pydantic ValidationError into the spec error naming the field (code 7)."""

from __future__ import annotations

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
