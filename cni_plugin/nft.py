"""The one way this project runs nft: masquerade (masq.py), the source check (sourcecheck.py),
the node controller's masquerade (node/effects.py) and NetworkPolicy (node/netpol/apply.py) all
call run(). Each table is written by its own module only. (Hot paths send nf_tables messages
without nft, nfbatch.py: an ADD's source-check setup and a DEL's teardown, NetworkPolicy's
element changes.)

Every run is bounded by `timeout` and every failure is an NftError carrying nft's error text:
missing binary, exec error, non-zero exit, a run past its deadline (the exec'd nft is killed),
unparsable JSON. Callers map it to their contract (a CNI verb's error code; the node controller's
loops retry the step), so a hung or failing nft fails one operation, never a process.

`in_process` runs the script through libnftables (libnft.py) where the library is there: the
source check's transactions that fall back to nft then cost ~1.5 ms instead of ~15 ms for
exec'ing nft, NetworkPolicy's changes ~8 ms instead of 24-37 ms. A hung exec'd nft is killed at
its deadline; a hung library call is not: it fails its caller at the deadline and holds the
library's lock until it returns, so later in-process runs fail within theirs meanwhile (how
NetworkPolicy's loop copes with that: node/netpol/apply.py). The node controller's masquerade
still execs.
"""

from __future__ import annotations

import json as jsonlib
import subprocess
from collections.abc import Sequence
from typing import Any

from cnikit import turns

from . import hostnet, libnft

TIMEOUT = 30.0  # seconds one nft run may take
# nft's error text when what a command names does not exist (never made, or a concurrent run
# removed it first).
GONE = ("No such file or directory",)


class NftError(Exception):
    """nft failed, was missing, or did not finish in time. `details`: which command and what nft
    said (its error text), or why it did not run."""

    def __init__(self, details: str) -> None:
        super().__init__(f"nft failed: {details}")
        self.details = details

    def says(self, markers: Sequence[str]) -> bool:
        """Whether nft's error text holds one of `markers`."""
        return any(marker in self.details for marker in markers)


def binary() -> str:
    found = hostnet.find_binary("nft")
    if not found:
        raise NftError("not found in PATH or sbin")
    return found


def run(script: str, *, timeout: float | None = None, json: bool = False, check: bool = False,
        command: Sequence[str] | None = None, in_process: bool = False) -> str:
    """nft's output for `script` (`json`: one list command, answered as JSON; `check`: dry run),
    in the calling thread's netns, within `timeout` (default TIMEOUT). `command`: the nft to exec
    (default: the one on PATH or sbin)."""
    timeout = TIMEOUT if timeout is None else timeout
    if in_process and not check and command is None and libnft.available():
        try:
            code, output, error = libnft.run(script, timeout, json)
        except TimeoutError as exc:
            raise NftError(str(exc)) from exc
        if code != 0:
            raise NftError(_said(script, json, error))
        return output
    argv = [*(command or [binary()]), *(["-c"] if check else [])]
    # `nft -j -f -` prints no listing (nft 1.0.6): a JSON list goes on the command line.
    argv += ["-j", *script.split()] if json else ["-f", "-"]
    try:
        with turns.waiting():
            proc = subprocess.run(argv, input="" if json else script, capture_output=True, text=True,
                                  timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NftError(f"did not finish within {timeout:g} s") from exc
    except OSError as exc:
        raise NftError(str(exc)) from exc
    if proc.returncode != 0:
        raise NftError(_said(script, json, proc.stderr))
    return proc.stdout


def _said(script: str, json: bool, error: str) -> str:
    """nft's error lines (not its echo of the script); a listing's command first."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    said = " | ".join([line for line in lines if "Error" in line] or lines[:1]) or "no error text"
    return f"{script}: {said[:500]}" if json else said[:500]


def listing(what: str, *, timeout: float | None = None, command: Sequence[str] | None = None,
            in_process: bool = False) -> list[dict[str, Any]]:
    """The items of `nft -j <what>` (one list command)."""
    out = run(what, timeout=timeout, json=True, command=command, in_process=in_process)
    try:
        items = jsonlib.loads(out)["nftables"]
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise TypeError("not a list of objects")
        return items
    except (ValueError, KeyError, TypeError) as exc:
        raise NftError(f"{what}: unexpected JSON listing: {exc}") from exc
