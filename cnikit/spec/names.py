"""Checks on names and configured paths that end up in paths, link names or rules, made before
anything is touched."""

from __future__ import annotations

import re

from .errors import INVALID_CONFIG, INVALID_ENV, CNIError

# SPEC: network names and container ids both start alphanumeric, then alphanumerics, '_', '.', '-'.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_NETWORK_NAME = 128
MAX_CONTAINER_ID = 256


def _check(value: str, max_len: int, code: int, what: str) -> str:
    if len(value) > max_len or not _NAME.fullmatch(value):
        raise CNIError(code, f"invalid {what}",
                       f"{value[:64]!r}: must match {_NAME.pattern}, at most {max_len} characters")
    return value


def validate_network_name(name: str) -> str:
    return _check(name, MAX_NETWORK_NAME, INVALID_CONFIG, "field 'name'")


def validate_container_id(value: str) -> str:
    return _check(value, MAX_CONTAINER_ID, INVALID_ENV, "CNI_CONTAINERID")


def absolute_path(value: object) -> str:
    """A configured path (logFile, dataDir, ...): absolute, one line, no '..' component."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or "\n" in value \
            or len(value) > 4096 or ".." in value.split("/"):
        raise ValueError("an absolute path without '..' is required")
    return value
