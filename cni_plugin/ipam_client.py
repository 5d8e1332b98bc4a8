"""Delegation to the IPAM plugin (SPEC section 4): pyipam runs in-process, any other type is
exec'd from CNI_PATH with the same environment and stdin, and its stderr passes through."""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from cnikit import turns
from cnikit.skel import Request
from cnikit.spec.errors import INTERNAL, INVALID_CONFIG, CNIError
from cnikit.spec.result import Result, parse_result

IN_PROCESS = "pyipam"
EXEC_TIMEOUT = 60.0


class IPAMPlugin(Protocol):
    def call(self, verb: str, req: Request) -> dict[str, Any] | None: ...


class InProcess:
    """pyipam in this process: the verb table its executable serves, imported by calls that use
    it; its notices reach this call's log and stderr as the exec'd plugin's would."""

    def call(self, verb: str, req: Request) -> dict[str, Any] | None:
        from ipam.verbs import VERBS, add_result

        if verb == "ADD":  # parse_result reads it next: converting it first would validate it twice
            return add_result(req)
        return VERBS[verb](req)


def _find_plugin(kind: str, path: tuple[str, ...]) -> str:
    for directory in path:
        candidate = os.path.join(directory, kind)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(INVALID_CONFIG, f"failed to find IPAM plugin {kind!r}",
                   f"not in CNI_PATH {':'.join(path) or '(empty)'}")


class Exec:
    """Any other IPAM type: its executable found in CNI_PATH."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def call(self, verb: str, req: Request) -> dict[str, Any] | None:
        return _exec(self.kind, verb, req)


def _exec(kind: str, verb: str, req: Request) -> dict[str, Any] | None:
    import subprocess  # here: ~4 ms of imports a one-shot call with in-process pyipam skips

    binary = _find_plugin(kind, req.cmd.path)
    env = {**req.env, "CNI_COMMAND": verb}
    try:
        with turns.waiting():
            proc = subprocess.run([binary], input=req.raw_config, env=env, stdout=subprocess.PIPE,
                                  timeout=EXEC_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CNIError(INTERNAL, f"IPAM plugin {kind} {verb} failed", str(exc)) from exc
    reply: Any = None
    if proc.stdout.strip():
        try:
            reply = json.loads(proc.stdout)
        except ValueError:
            reply = None
    if proc.returncode != 0:
        code = reply.get("code") if isinstance(reply, dict) else None
        if type(code) is int and code > 0:  # bool is an int too, and no error code
            raise CNIError(code, str(reply.get("msg", "")), str(reply.get("details", "")))
        raise CNIError(INTERNAL, f"IPAM plugin {kind} {verb} failed",
                       proc.stdout.decode(errors="replace")[:200] or f"exit {proc.returncode}")
    return reply if isinstance(reply, dict) else None


def plugin_for(kind: str) -> IPAMPlugin:
    return InProcess() if kind == IN_PROCESS else Exec(kind)


def add(req: Request, kind: str) -> Result:
    result = parse_result(plugin_for(kind).call("ADD", req), "IPAM result")
    if not result.ips:
        raise CNIError(INTERNAL, "IPAM plugin returned missing IP config")
    return result


def delete(req: Request, kind: str) -> None:
    plugin_for(kind).call("DEL", req)


def check(req: Request, kind: str) -> None:
    plugin_for(kind).call("CHECK", req)


def status(req: Request, kind: str) -> None:
    plugin_for(kind).call("STATUS", req)


def gc(req: Request, kind: str) -> list[str]:
    """Returns the errors, so the caller can finish its own GC before reporting them. The IPAM
    plugin takes the valid attachments from the same netconf."""
    try:
        plugin_for(kind).call("GC", req)
    except CNIError as exc:
        return [f"IPAM {kind}: {exc}"]
    return []
