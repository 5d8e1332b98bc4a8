"""Spec versions this plugin speaks and the checks on them."""

from __future__ import annotations

from .errors import INCOMPATIBLE_VERSION, CNIError

CURRENT = "1.1.0"
SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def check_supported(version: str) -> str:
    if version not in SUPPORTED:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}",
            f"supported versions: {', '.join(SUPPORTED)}",
        )
    return version


def at_least(version: str, minimum: str) -> bool:
    return _key(version) >= _key(minimum)
