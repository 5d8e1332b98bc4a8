"""Delegation to the IPAM plugin (SPEC section 4): pyipam runs in-process, any other type is
exec'd from CNI_PATH with the same environment and stdin, and its stderr passes through."""

from __future__ import annotations

import json
import os
import subprocess
from types import ModuleType
from typing import Any

from cnikit.skel import Request
from cnikit.spec.errors import INTERNAL, INVALID_CONFIG, CNIError
from cnikit.spec.result import Result, parse_result

IN_PROCESS = "pyipam"
EXEC_TIMEOUT = 60.0


def _pyipam() -> ModuleType:
    """pyipam in-process, imported only by calls that use it."""
    import ipam.plugin

    return ipam.plugin


def _find_plugin(kind: str, path: tuple[str, ...]) -> str:
    for directory in path:
        candidate = os.path.join(directory, kind)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(INVALID_CONFIG, f"failed to find IPAM plugin {kind!r}",
                   f"not in CNI_PATH {':'.join(path) or '(empty)'}")


def _exec(kind: str, verb: str, req: Request) -> dict[str, Any] | None:
    binary = _find_plugin(kind, req.cmd.path)
    env = {**req.env, "CNI_COMMAND": verb}
    try:
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


def add(req: Request, kind: str) -> Result:
    if kind == IN_PROCESS:
        reply: Any = _pyipam().ipam_add(req.config, req.cmd.container_id, req.cmd.ifname, req.cmd.cni_args)
    else:
        reply = _exec(kind, "ADD", req)
    result = parse_result(reply, "IPAM result")
    if not result.ips:
        raise CNIError(INTERNAL, "IPAM plugin returned missing IP config")
    return result


def delete(req: Request, kind: str) -> None:
    if kind == IN_PROCESS:
        _pyipam().ipam_del(req.config, req.cmd.container_id, req.cmd.ifname)
    else:
        _exec(kind, "DEL", req)


def check(req: Request, kind: str) -> None:
    if kind == IN_PROCESS:
        _pyipam().ipam_check(req.config, req.cmd.container_id, req.cmd.ifname)
    else:
        _exec(kind, "CHECK", req)


def status(req: Request, kind: str) -> None:
    if kind == IN_PROCESS:
        _pyipam().ipam_status(req.config)
    else:
        _exec(kind, "STATUS", req)


def gc(req: Request, kind: str, valid: set[tuple[str, str]]) -> list[str]:
    """Returns the errors, so the caller can finish its own GC before reporting them."""
    try:
        if kind == IN_PROCESS:
            _pyipam().ipam_gc(req.config, valid)
        else:
            _exec(kind, "GC", req)
    except CNIError as exc:
        return [f"IPAM {kind}: {exc}"]
    return []
