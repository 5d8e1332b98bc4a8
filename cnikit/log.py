"""JSON logs to a file, never to stdout (stdout carries only the CNI result).

Logging is off unless the netconf's `logFile` or PYBRIDGE_LOG_FILE names a file; structlog is
imported only then, so a call without logging does not pay for it.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from collections.abc import Mapping
from typing import IO, Any, TextIO, cast

from cnikit.spec.errors import INVALID_CONFIG, CNIError
from cnikit.spec.names import absolute_path

ENV_VAR = "PYBRIDGE_LOG_FILE"


def validate_log_path(path: object) -> str:
    try:
        return absolute_path(path)
    except ValueError as exc:
        raise CNIError(INVALID_CONFIG, "invalid field 'logFile'", str(exc)) from None


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


class Logger:
    """One call's log (or the process's own): JSON lines into one file or stream, or nowhere.

    Bound per call and handed on through the request, so concurrent calls of one agent with
    different `logFile`s each write only into their own."""

    def __init__(self, stream: TextIO | None = None, owned: bool = False,
                 echo: IO[str] | None = None) -> None:
        self._stream = stream
        self._owned = owned
        self._echo = echo
        self._logger: Any = None
        if stream is not None:
            import structlog

            self._logger = structlog.wrap_logger(
                structlog.WriteLogger(stream),
                processors=[
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(),
                ],
            )

    def event(self, name: str, **fields: Any) -> None:
        if self._logger is not None:
            self._logger.info(name, **fields)

    def warning(self, name: str, **fields: Any) -> None:
        if self._logger is not None:
            self._logger.warning(name, **fields)

    def notice(self, message: str) -> None:
        """A warning for the runtime's operator (a skipped store file, say): on the call's
        stderr as one line, and in its log."""
        if self._echo is not None:
            self._echo.write(f"{message}\n")
        self.warning("notice", message=message)

    def exception(self, name: str, **fields: Any) -> None:
        if self._logger is not None:
            self._logger.error(name, exc_info=True, **fields)

    def close(self) -> None:
        if self._owned and self._stream is not None:
            self._stream.close()
            self._stream = self._logger = None


NOWHERE = Logger()
_process = NOWHERE


def for_call(config_path: object, env: Mapping[str, str], echo: IO[str] | None = None) -> Logger:
    """The log of one call: the netconf's `logFile`, else PYBRIDGE_LOG_FILE, else none; notices
    also go to `echo` (the call's stderr). The file is opened for this call alone; the caller
    closes it when the call is done."""
    path = config_path if config_path is not None else env.get(ENV_VAR) or None
    if path is None:
        return Logger(echo=echo)
    fd = _open_log(validate_log_path(path))
    return Logger(os.fdopen(fd, "a", buffering=1), owned=True, echo=echo)


class _Stderr(io.TextIOBase):
    """Whatever sys.stderr is when a line is written (a test's capture, say), not at import."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def to_stderr() -> Logger:
    """JSON lines on stderr: the node controller's log, read with `kubectl logs`. structlog writes
    each line whole under its stream's lock, so the agent's threads never share a line."""
    return Logger(cast(TextIO, _Stderr()))  # structlog needs only write and flush


def open_process_log(env: Mapping[str, str]) -> Logger:
    """The long-lived process's own log (the agent's PYBRIDGE_LOG_FILE), created now, so its
    warnings outside any call (bad requests, removals) have somewhere to go."""
    global _process
    _process = for_call(None, env)
    return _process


def process() -> Logger:
    return _process
