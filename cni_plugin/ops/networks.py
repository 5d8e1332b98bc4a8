"""The networks a node is configured with, found as libcni finds them: the conf dir's `*.conflist`,
`*.conf` and `*.json` in lexical order. A single-plugin `.conf` counts as a list of one.

Every file is hostile input: one that does not parse is reported in `Conf.error`, never fatal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cnikit.ip import IPAddress
from cnikit.spec.errors import CNIError
from ipam.config import IPAMConfig, describe, load_ipam_config, pool_size, subnets
from ipam.disk import DiskStore

from .. import nsrecord

DEFAULT_CONF_DIR = "/etc/cni/net.d"
CONF_DIR_ENV = "PYBRIDGE_CONF_DIR"
EXTENSIONS = (".conflist", ".conf", ".json")
STORE_TYPES = nsrecord.STORE_TYPES  # IPAM plugins whose store this node can read
BRIDGE_TYPES = ("pybridge", "bridge")
MAX_CONF_BYTES = 1 << 20
DEFAULT_CACHE_DIR = "/var/lib/cni/results"  # libcni's result cache


@dataclass(frozen=True)
class Conf:
    path: str
    name: str = ""
    cni_version: str = ""
    plugins: tuple[dict[str, Any], ...] = ()
    error: str | None = None

    def bridge_plugin(self) -> dict[str, Any] | None:
        return next((p for p in self.plugins if p.get("type") in BRIDGE_TYPES), None)

    @property
    def bridge(self) -> str | None:
        plugin = self.bridge_plugin()
        return str(plugin.get("bridge") or "cni0") if plugin is not None else None

    def ipam(self) -> IPAMConfig | None:
        """The IPAM config of the store-backed plugin, if any; CNIError if it is invalid."""
        for plugin in self.plugins:
            block = plugin.get("ipam")
            if isinstance(block, dict) and block.get("type") in STORE_TYPES:
                return load_ipam_config({"name": self.name, "ipam": block}, {})
        return None


def conf_dir(given: str | None) -> str:
    return given or os.environ.get(CONF_DIR_ENV) or DEFAULT_CONF_DIR


def conf_files(directory: str) -> list[str]:
    """The conf files in libcni's order; [] if the directory is missing."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names if n.endswith(EXTENSIONS)]


def load(path: str) -> Conf:
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read(MAX_CONF_BYTES + 1)[:MAX_CONF_BYTES])
    except (OSError, ValueError) as exc:
        return Conf(path, error=f"cannot read: {exc}")
    if not isinstance(raw, dict):
        return Conf(path, error="not a JSON object")
    plugins = raw.get("plugins") if path.endswith(".conflist") else [raw]
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
        return Conf(path, error="'plugins' must be a non-empty list of objects")
    name, version = raw.get("name"), raw.get("cniVersion")
    if not isinstance(name, str) or not name:
        return Conf(path, error="'name' is missing")
    if not isinstance(version, str):
        return Conf(path, error="'cniVersion' is missing")
    return Conf(path, name, version, tuple(plugins))


def load_all(directory: str) -> list[Conf]:
    return [load(path) for path in conf_files(directory)]


def stores(confs: list[Conf]) -> list[tuple[Conf, IPAMConfig]]:
    """Each readable network with an IPAM store, once per (data dir, network)."""
    seen: set[tuple[str, str]] = set()
    found = []
    for conf in confs:
        if conf.error:
            continue
        try:
            cfg = conf.ipam()
        except CNIError:
            continue
        if cfg is not None and (cfg.data_dir, cfg.network) not in seen:
            seen.add((cfg.data_dir, cfg.network))
            found.append((conf, cfg))
    return found


@dataclass(frozen=True)
class RangeUse:
    """One range set of a network: its subnets, its ranges and how many of its addresses are taken."""

    network: str
    subnets: str  # "10.244.1.0/24"
    ranges: str  # "10.244.1.2-10.244.1.254", as pyipam's EXHAUSTED message names the set
    used: int
    size: int

    @property
    def free(self) -> int:
        return max(self.size - self.used, 0)


def range_use(cfg: IPAMConfig, reserved: Iterable[IPAddress]) -> list[RangeUse]:
    """Use per range set: an address counts where its set's pool holds it (gateways never do)."""
    reserved = list(reserved)
    return [RangeUse(cfg.network, subnets(rs), describe(rs),
                     sum(1 for ip in reserved if any(r.contains(ip) and ip != r.gateway for r in rs)),
                     pool_size((rs,)))
            for rs in cfg.ranges]


def open_store(cfg: IPAMConfig) -> DiskStore:
    return DiskStore(cfg.data_dir, cfg.network, lock_timeout=cfg.lock_timeout, warn=lambda _message: None)


def reserved_ips(cfg: IPAMConfig) -> list[IPAddress] | None:
    """The store's reserved addresses; None when it cannot be read (locked too long, unreadable):
    no figure beats a wrong one."""
    store = open_store(cfg)
    if not store.exists():
        return []
    try:
        with store.lock():
            return [r.ip for r in store.reservations()]
    except CNIError:
        return None
