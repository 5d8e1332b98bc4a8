"""Checks on names that end up in paths, link names or rules, made before anything is touched."""

from __future__ import annotations

import re

from .errors import INVALID_CONFIG, CNIError

# SPEC "Network configuration": name starts alphanumeric, then alphanumerics, '_', '.', '-'.
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_NETWORK_NAME = 128


def validate_network_name(name: str) -> str:
    if len(name) > MAX_NETWORK_NAME or not _NETWORK_NAME.fullmatch(name):
        raise CNIError(
            INVALID_CONFIG,
            "invalid field 'name'",
            f"{name[:64]!r}: must match {_NETWORK_NAME.pattern}, at most {MAX_NETWORK_NAME} chars",
        )
    return name
