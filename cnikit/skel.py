"""The plugin skeleton: one call in (env + stdin), one JSON document out, an exit code back.

It holds no globals and takes its IO as arguments, so the same function serves the exec'd
binary, a resident agent and the unit tests.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from cnikit.spec import version
from cnikit.spec.args import CmdArgs, from_env
from cnikit.spec.errors import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    IO_FAILURE,
    CNIError,
)
from cnikit.spec.names import validate_network_name

from . import log

if TYPE_CHECKING:
    from cnikit.removals import Removals

MAX_STDIN = 4 * 1024 * 1024

# Verbs that only exist from some spec version on (skel's version gates, as one table).
_MIN_VERSION = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


@dataclass(frozen=True)
class Request:
    cmd: CmdArgs
    env: Mapping[str, str]
    config: dict[str, Any]
    raw_config: bytes
    cni_version: str
    # The pod netns already opened by a client that forwarded the call (see agent/), because
    # a netns path may only resolve in the client's mount namespace.
    netns_fd: int | None = None
    # Where a long-lived caller (the agent) lets slow teardown finish after the reply.
    removals: Removals | None = None
    # What a long-lived caller keeps of pyipam's stores between calls (the agent's
    # ipam.index.Indexes): typed by ipam, which cnikit does not import.
    ipam_indexes: object = None
    # Told (network, count) of the addresses each pyipam GC released: the agent's metrics.
    ipam_gc_released: Callable[[str, int], None] | None = None
    # The kernel to the verbs (cni_plugin.host.Host, which cnikit does not import): a long-lived
    # caller's, kept across calls, or the unit tests' fake; None: the real one, made per call.
    host: object = None
    # This call's log (the netconf's logFile): never a process-wide one, calls run concurrently.
    log: log.Logger = log.NOWHERE


Verb = Callable[[Request], "dict[str, Any] | None"]


def _read_stdin(stdin: IO[bytes]) -> bytes:
    try:
        data = stdin.read(MAX_STDIN + 1)
    except OSError as exc:
        raise CNIError(IO_FAILURE, "failed to read stdin", str(exc)) from exc
    if len(data) > MAX_STDIN:
        raise CNIError(DECODE_FAILURE, "network configuration too large", f"over {MAX_STDIN} bytes")
    return data


def decode_config(data: bytes) -> dict[str, Any]:
    # UTF-8 only, as the Go reference: json.loads(bytes) would also take a BOM or UTF-16/32.
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CNIError(DECODE_FAILURE, "failed to decode network configuration", str(exc)) from exc
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "network configuration must be a JSON object")
    return config


def config_version(config: Mapping[str, Any]) -> str:
    raw = config.get("cniVersion", "")
    if not isinstance(raw, str) or not raw:
        raise CNIError(INCOMPATIBLE_VERSION, "missing or invalid field 'cniVersion'",
                       f"supported versions: {', '.join(version.SUPPORTED)}")
    return version.check_supported(raw)


def version_reply(asked: str = version.CURRENT) -> dict[str, Any]:
    """The VERSION answer; the compiled client is built from it (install.build_client)."""
    return {"cniVersion": asked, "supportedVersions": list(version.SUPPORTED)}


def _version_reply(stdin: IO[bytes]) -> dict[str, Any]:
    """Like the reference skel, VERSION does not fail on what stdin holds."""
    try:
        raw = decode_config(_read_stdin(stdin)).get("cniVersion")
    except CNIError:
        raw = None
    return version_reply(raw) if isinstance(raw, str) and raw else version_reply()


def parse_request(
    cmd: CmdArgs, env: Mapping[str, str], data: bytes, netns_fd: int | None = None,
    removals: Removals | None = None, decoded: dict[str, Any] | None = None,
) -> Request:
    """`decoded`: `data` already decoded by a caller that needed it first (the agent)."""
    config = decoded if decoded is not None else decode_config(data)
    name = config.get("name")
    if not isinstance(name, str):
        raise CNIError(INVALID_CONFIG, "missing or invalid field 'name'", "a string is required")
    validate_network_name(name)
    cni_version = config_version(config)
    minimum = _MIN_VERSION.get(cmd.command)
    if minimum and not version.at_least(cni_version, minimum):
        raise CNIError(INCOMPATIBLE_VERSION,
                       f"config version {cni_version} does not allow {cmd.command}",
                       f"{cmd.command} needs cniVersion >= {minimum}")
    return Request(cmd=cmd, env=env, config=config, raw_config=data, cni_version=cni_version,
                   netns_fd=netns_fd, removals=removals)


def about_text(program: str) -> str:
    return f"{program}: CNI plugin, spec versions {', '.join(version.SUPPORTED)}\n"


def run(
    verbs: Callable[[], Mapping[str, Verb]],
    env: Mapping[str, str],
    stdin: IO[bytes],
    stdout: IO[str],
    program: str,
    stderr: IO[str] | None = None,
    netns_fd: int | None = None,
    removals: Removals | None = None,
    ipam_indexes: object = None,
    ipam_gc_released: Callable[[str, int], None] | None = None,
    host: object = None,
    decoded: dict[str, Any] | None = None,
) -> int:
    """Serve one CNI call; returns the process exit code. `verbs` is called only once a verb
    needs serving, so VERSION and argument errors never import the heavy modules. `decoded`:
    stdin's config as a caller decoded it already (decode_config), so it is decoded once."""
    err = stderr if stderr is not None else sys.stderr
    if not env.get("CNI_COMMAND"):
        err.write(about_text(program))
        return 0
    started = time.monotonic()
    cni_version = version.CURRENT
    cmd: CmdArgs | None = None
    req: Request | None = None
    logger = log.NOWHERE
    code = 0
    try:
        cmd = from_env(env)
        if cmd.command == "VERSION":
            stdout.write(json.dumps(_version_reply(stdin)))
            return 0
        req = parse_request(cmd, env, _read_stdin(stdin), netns_fd, removals, decoded)
        cni_version = req.cni_version
        logger = log.for_call(req.config.get("logFile"), env, echo=err)
        req = dataclasses.replace(req, log=logger, ipam_indexes=ipam_indexes,
                                  ipam_gc_released=ipam_gc_released, host=host)
        result = verbs()[cmd.command](req)
        if result is not None:
            stdout.write(json.dumps(result))
        return 0
    except CNIError as exc:
        code = exc.code
        stdout.write(exc.to_json(cni_version))
        return 1
    except Exception as exc:  # the one place unexpected errors become code 999
        code = INTERNAL
        one_line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        stdout.write(CNIError(INTERNAL, "internal error", one_line).to_json(cni_version))
        err.write(f"{program}: internal error: {one_line}\n")
        logger.exception("internal error", program=program)
        return 1
    finally:
        if cmd is not None and cmd.command != "VERSION":
            logger.event(
                "cni_call",
                program=program,
                verb=cmd.command,
                container_id=cmd.container_id,
                ifname=cmd.ifname,
                netns=cmd.netns,
                network=req.config.get("name") if req else None,
                code=code,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
            )
        logger.close()
