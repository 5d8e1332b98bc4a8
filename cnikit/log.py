"""JSON logs to a file, never to stdout (stdout carries only the CNI result).

Logging is off unless the netconf's `logFile` or PYBRIDGE_LOG_FILE names a file; structlog is
imported only then, so a call without logging does not pay for it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any

from cnikit.spec.errors import INVALID_CONFIG, CNIError

ENV_VAR = "PYBRIDGE_LOG_FILE"

_logger: Any = None
_path: str | None = None


def validate_log_path(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or "\n" in path \
            or len(path) > 4096 or "/../" in path + "/":
        raise CNIError(INVALID_CONFIG, "invalid field 'logFile'", "an absolute path without '..' is required")
    return path


def _log_error(path: str, why: str) -> CNIError:
    return CNIError(INVALID_CONFIG, "invalid field 'logFile'", f"{path}: {why}")


def _open_log(path: str) -> int:
    """Append to a new file, created 0600, or to one pybridge made: root's (the caller's uid),
    0600, one link, holding JSON lines. Anything else (a copy of /etc/passwd, a key, someone
    else's file) is refused. A symlink is not followed and a FIFO does not block (O_NONBLOCK)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = _open_existing_log(path, flags)
    except OSError as exc:
        raise _log_error(path, exc.strerror or str(exc)) from exc
    os.set_blocking(fd, True)
    return fd


def _open_existing_log(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _log_error(path, exc.strerror or str(exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise _log_error(path, "not a regular file with one link")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise _log_error(path, f"not a log pybridge made (owner uid {st.st_uid}, mode "
                                   f"{stat.S_IMODE(st.st_mode):o}; want uid {os.geteuid()}, 0600)")
        if os.pread(fd, 1, 0) not in (b"", b"{"):
            raise _log_error(path, "not a log pybridge made (it does not hold JSON lines)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def configure(config_path: object, env: Mapping[str, str]) -> None:
    """Point the logger at the configured file (config wins over the environment)."""
    global _logger, _path
    path = config_path if config_path is not None else env.get(ENV_VAR) or None
    if path is None:
        return
    path = validate_log_path(path)
    if path == _path:
        return
    import structlog

    fd = _open_log(path)
    stream = os.fdopen(fd, "a", buffering=1)
    _logger = structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    _path = path


def call_done(**fields: Any) -> None:
    if _logger is not None:
        _logger.info("cni_call", **fields)


def event(name: str, **fields: Any) -> None:
    if _logger is not None:
        _logger.info(name, **fields)


def warning(name: str, **fields: Any) -> None:
    if _logger is not None:
        _logger.warning(name, **fields)


def exception(name: str, **fields: Any) -> None:
    if _logger is not None:
        _logger.error(name, exc_info=True, **fields)
