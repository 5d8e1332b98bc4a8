"""pyipam's verb table, served by its executable (`__main__`) and by the agent.

GC takes the valid attachments from `cni.dev/valid-attachments` (spec HEAD) or else
`cni.dev/attachments` (the spec-v1.1.0 tag's name); libcni sends both. With neither key (or a
null one) nothing is valid and every reservation of the network is released: that is what
`cnitool gc` asks for, and the spec says an empty list is meaningful.
"""

from __future__ import annotations

from typing import Any

from cnikit import skel
from cnikit.spec.attachments import valid_attachments
from cnikit.spec.result import convert_result

from . import plugin
from .index import Indexes


def _indexes(req: skel.Request) -> Indexes | None:
    """The caller's store indexes (the agent's); None in a one-shot call."""
    return req.ipam_indexes if isinstance(req.ipam_indexes, Indexes) else None


def add_result(req: skel.Request) -> dict[str, Any]:
    """The ADD result as pyipam makes it (1.1.0-shaped), before conversion to the caller's
    version: what an in-process caller that parses it anyway wants."""
    cmd = req.cmd
    return plugin.ipam_add(req.config, cmd.container_id, cmd.ifname, cmd.cni_args, req.log.notice,
                           _indexes(req))


def add(req: skel.Request) -> dict[str, Any]:
    return convert_result(add_result(req), req.cni_version)


def delete(req: skel.Request) -> None:
    plugin.ipam_del(req.config, req.cmd.container_id, req.cmd.ifname, req.log.notice, _indexes(req))


def check(req: skel.Request) -> None:
    plugin.ipam_check(req.config, req.cmd.container_id, req.cmd.ifname, req.log.notice, _indexes(req))


def status(req: skel.Request) -> None:
    plugin.ipam_status(req.config, req.log.notice, _indexes(req))


def gc(req: skel.Request) -> None:
    plugin.ipam_gc(req.config, valid_attachments(req.config), req.log.notice, _indexes(req),
                   req.ipam_gc_released)


VERBS: dict[str, skel.Verb] = {"ADD": add, "DEL": delete, "CHECK": check, "STATUS": status, "GC": gc}
