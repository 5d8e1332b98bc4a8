"""`pybridge doctor`: the checks an operator would make before filing a bug, each ok / warn / fail
with a one-line fix. Everything is read in the netns and mount namespace it runs in."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property

from cnikit.programs import PYBRIDGE
from cnikit.spec.errors import CNIError
from cnikit.spec.version import SUPPORTED

from .. import chain, rtnl
from ..agent import wire
from ..agent.forward import forward
from ..hostnet import NETPOL_REFUSED, NETPOL_TABLE
from . import attachments, networks

OK, WARN, FAIL = "ok", "warn", "fail"
TIMEOUT = 10.0
# The newest spec version each runtime's libcni accepts: containerd 1.x vendors libcni 1.1, 2.x libcni 1.2.
CONTAINERD_MAX = {1: "1.0.0", 2: "1.1.0"}


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    message: str
    fix: str = ""


@dataclass
class Node:
    """What the checks look at, read once."""

    conf_dir: str
    bin_dir: str
    cache_dir: str = networks.DEFAULT_CACHE_DIR
    agent_socket: str = wire.DEFAULT_SOCKET

    @cached_property
    def confs(self) -> list[networks.Conf]:
        return networks.load_all(self.conf_dir)

    @cached_property
    def rows(self) -> list[attachments.Attachment]:
        return attachments.collect(self.confs, self.cache_dir)

    @cached_property
    def ruleset(self) -> str:
        """nftables ruleset plus iptables-save output (either may be missing)."""
        return "\n".join(_run([tool, *args]) for tool, *args in
                         (("nft", "list", "ruleset"), ("iptables-save",), ("ip6tables-save",)))


def _run(cmd: list[str], env: dict[str, str] | None = None, stdin: bytes = b"") -> str:
    if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False, env=env,
                              input=stdin).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return ""


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def check_dirs(node: Node) -> Check:
    missing = [f"{what} {d}" for what, d in (("bin dir", node.bin_dir), ("conf dir", node.conf_dir))
               if not os.path.isdir(d)]
    if missing:
        return Check("dirs", FAIL, f"missing: {', '.join(missing)}",
                     "create it or point the runtime's CNI bin_dir/conf_dir at the right place")
    return Check("dirs", OK, f"bin dir {node.bin_dir} and conf dir {node.conf_dir} present")


def check_conflist(node: Node) -> Check:
    if not node.confs:
        return Check("conflist", FAIL, f"no conf file in {node.conf_dir}",
                     "install a conflist (conf/10-pybridge.conflist) or start the node controller")
    first = node.confs[0]
    if first.error:
        return Check("conflist", FAIL, f"{first.path}: {first.error}", "fix the file or remove it")
    missing = [str(t) for p in first.plugins for t in (p.get("type"), _ipam_type(p))
               if t and not os.access(os.path.join(node.bin_dir, str(t)), os.X_OK)]
    if missing:
        return Check("conflist", FAIL, f"{first.path} names plugins missing from {node.bin_dir}: "
                     f"{', '.join(missing)}", f"install them into {node.bin_dir} (make install)")
    return Check("conflist", OK, f"{first.path} (network {first.name}) parses, its plugins are installed")


def _ipam_type(plugin: dict[str, object]) -> str | None:
    block = plugin.get("ipam")
    kind = block.get("type") if isinstance(block, dict) else None
    return kind if isinstance(kind, str) else None


def _runtime_max() -> tuple[str, str] | None:
    """(runtime and version, newest cniVersion it accepts), read from containerd if installed."""
    match = re.search(r"\bv?(\d+)\.(\d+)\.(\d+)", _run(["containerd", "--version"]))
    if match is None:
        return None
    major = int(match.group(1))
    return f"containerd {match.group(0).lstrip('v')}", CONTAINERD_MAX.get(major, CONTAINERD_MAX[2])


def check_cni_version(node: Node) -> Check:
    if not node.confs or node.confs[0].error:
        return Check("cniVersion", WARN, "no readable conflist to check", "see the conflist check")
    version = node.confs[0].cni_version
    if version not in SUPPORTED:
        return Check("cniVersion", FAIL, f"cniVersion {version!r} is not one pybridge accepts",
                     f"set cniVersion to one of {', '.join(SUPPORTED)}")
    runtime = _runtime_max()
    if runtime is None:
        return Check("cniVersion", OK, f"cniVersion {version} accepted by pybridge (no runtime found to ask)")
    name, newest = runtime
    if _key(version) > _key(newest):
        return Check("cniVersion", FAIL, f"cniVersion {version} is newer than {name} accepts ({newest})",
                     f"set cniVersion to {newest} in {node.confs[0].path}")
    return Check("cniVersion", OK, f"cniVersion {version} accepted by pybridge and {name}")


def _versions(reply: bytes) -> list[str] | None:
    try:
        versions = json.loads(reply).get("supportedVersions")
    except (ValueError, AttributeError):
        return None
    return versions if isinstance(versions, list) else None


def check_agent(node: Node) -> Check:
    request = b'{"cniVersion": "1.1.0"}'
    env = {b"CNI_COMMAND": b"VERSION", b"CNI_PATH": node.bin_dir.encode()}
    reply = forward(PYBRIDGE.encode(), request, env, node.agent_socket.encode())
    if reply is None:
        return Check("agent", WARN, f"no agent at {node.agent_socket}: calls are served in-process (slower)",
                     "start `pybridge agent` (conf/pybridge-agent.service, or the DaemonSet)")
    agent = _versions(reply[1])
    client_path = os.path.join(node.bin_dir, PYBRIDGE)
    no_agent = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION",
                wire.SOCKET_ENV: os.path.join(node.bin_dir, ".no-agent")}
    client = _versions(_run([client_path], env=no_agent, stdin=request).encode()) \
        if os.access(client_path, os.X_OK) else None
    if agent is None or (client is not None and agent != client):
        return Check("agent", FAIL, f"agent speaks {agent}, the installed client {client}",
                     "restart the agent after upgrading the plugin")
    return Check("agent", OK, f"agent at {node.agent_socket} answers, same versions as {client_path}")


def check_ip_forward(_node: Node) -> Check:
    value = _read("/proc/sys/net/ipv4/ip_forward")
    if value != "1":
        return Check("ip_forward", FAIL, f"net.ipv4.ip_forward is {value}: pods cannot reach beyond the node",
                     "sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d)")
    return Check("ip_forward", OK, "net.ipv4.ip_forward is 1")


def check_br_netfilter(node: Node) -> Check:
    if "KUBE-SERVICES" not in node.ruleset:
        return Check("br_netfilter", OK, "no Services (no KUBE-SERVICES rules) on this node")
    value = _read("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if value is None:
        return Check("br_netfilter", FAIL, "Services in use but br_netfilter is not loaded: pod-to-Service "
                     "traffic on the bridge skips kube-proxy's rules", "modprobe br_netfilter")
    if value != "1":
        return Check("br_netfilter", FAIL, "Services in use but net.bridge.bridge-nf-call-iptables is 0",
                     "sysctl -w net.bridge.bridge-nf-call-iptables=1")
    return Check("br_netfilter", OK, "br_netfilter loaded, bridge-nf-call-iptables is 1")


def _loose(path: str) -> str | None:
    """Why `path` is not safe as root's store (owner, group/world writable), or None."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}"
    return None


def check_stores(node: Node) -> Check:
    problems = []
    for _conf, cfg in networks.stores(node.confs):
        store = os.path.join(cfg.data_dir, cfg.network)
        paths = [cfg.data_dir, store]
        if os.path.isdir(store) and not os.path.islink(store):
            paths += sorted(os.path.join(store, n) for n in os.listdir(store))
        problems += [p for p in map(_loose, paths) if p]
    if problems:
        return Check("stores", FAIL, f"IPAM store not private: {'; '.join(problems[:3])}",
                     "chown -R root:root and chmod go-w the store (directories 0700, files 0600)")
    count = len(networks.stores(node.confs))
    return Check("stores", OK, f"{count} IPAM store(s) owned by root, not writable by others")


def check_attachments(node: Node) -> Check:
    stale = [r for r in node.rows if r.state != attachments.OK]
    if stale:
        shown = "; ".join(f"{r.network} {r.container_id[:12] or r.host_veth}: {r.state}" for r in stale[:3])
        return Check("attachments", WARN, f"{len(stale)} stale attachment(s): {shown}",
                     "`pybridge ls` lists them (no runtime calls CNI GC); the agent's collector releases "
                     "those whose netns and veth are gone, `pybridge gc --dry-run` shows which and why "
                     "it keeps the others; send a CNI DEL for those it keeps")
    return Check("attachments", OK, f"{len(node.rows)} attachment(s), all with a reservation and a veth")


def _uplink_and_mtus(bridges: set[str]) -> tuple[tuple[str, int] | None, dict[str, int]]:
    with rtnl.Socket() as sock:
        links = {link.index: link for link in sock.links()}
        default = sock.default_links()
    uplink = links.get(default[0]) if default else None
    mtus = {link.name: link.mtu for link in links.values() if link.name in bridges}
    return ((uplink.name, uplink.mtu) if uplink else None), mtus


def check_mtu(node: Node) -> Check:
    bridges = {c.bridge for c in node.confs if not c.error and c.bridge}
    uplink, mtus = _uplink_and_mtus(bridges)
    if uplink is None or not mtus:
        return Check("mtu", OK, "no default route or no bridge yet: nothing to compare")
    name, mtu = uplink
    over = [f"{b} {m}" for b, m in sorted(mtus.items()) if m > mtu]
    if over:
        return Check("mtu", FAIL, f"bridge MTU above the uplink's ({name} {mtu}): {', '.join(over)}",
                     f"set \"mtu\": {mtu} (or less) in the conflist and recreate the bridge")
    return Check("mtu", OK, f"bridge MTU within the uplink's ({name} {mtu})")


def _without_bridge_tables(ruleset: str) -> str:
    """`nft list ruleset` text without its bridge-family tables (a table starts at column 0 and
    ends at the next line that is a lone `}`)."""
    return re.sub(r"(?ms)^table bridge .*?^}$", "", ruleset)


def check_masquerade(node: Node) -> Check:
    masq_networks = {c.name for c in node.confs if not c.error and (c.bridge_plugin() or {}).get("ipMasq")}
    wanted = [a for r in node.rows if r.state == attachments.OK and r.network in masq_networks
              for a in r.addresses]
    rules = _without_bridge_tables(node.ruleset)  # sourceCheck's port chains name pod addresses too
    missing = [a for a in wanted if not re.search(rf"(?<![\w.:]){re.escape(a)}(?![\w.:])", rules)]
    if missing:
        return Check("masquerade", FAIL, f"no masquerade rule for {', '.join(missing[:4])}",
                     "nft/iptables rules were flushed: CHECK names the pod; recreate it (DEL then ADD)")
    return Check("masquerade", OK, f"{len(wanted)} pod address(es) of ipMasq networks masqueraded")


def check_network_policy(node: Node) -> Check:
    """The node controller marks each policy it enforces as allowing nothing in a direction, because
    a field of it could not be read, in the comment of the policy's chain (netpol/nft.py)."""

    if f"table inet {NETPOL_TABLE}" not in node.ruleset:
        return Check("netpolicy", OK, "no NetworkPolicy rules on this node")
    closed = sorted(set(re.findall(rf'comment "(\S+) {re.escape(NETPOL_REFUSED)} ([^"]*)"', node.ruleset)))
    if closed:
        shown = "; ".join(f"{name} ({fields})" for name, fields in closed[:3])
        return Check("netpolicy", WARN, f"{len(closed)} NetworkPolicy(ies) enforced as allowing nothing in a "
                     f"direction, a field refused: {shown}",
                     "fix the field the node controller logs (netpol-refused); the selected pods stay "
                     "isolated")
    return Check("netpolicy", OK, "every NetworkPolicy enforced on this node was read whole")



# Chains: every plugin of every conflist asked for VERSION (chain.py says why one that rejects the
# conflist's cniVersion leaks as well as fails).


def _chain_types(conf: networks.Conf) -> list[str]:
    types = [t for p in conf.plugins for t in (p.get("type"), _ipam_type(p)) if isinstance(t, str) and t]
    return list(dict.fromkeys(types))


def chain_problems(node: Node) -> tuple[list[str], list[str]]:
    """(problems of the conflist the runtime uses, of the others): each plugin whose VERSION does
    not list its conflist's cniVersion, or that could not be asked, with the version all would take."""
    probes: dict[str, chain.Probe] = {}  # each plugin asked once, with a bounded wait
    used: list[str] = []
    others: list[str] = []
    for index, conf in enumerate(node.confs):
        if conf.error:
            continue
        for t in _chain_types(conf):
            if t not in probes:
                probes[t] = chain.probe(t, [node.bin_dir], timeout=chain.VERSION_TIMEOUT)
        found = [probes[t] for t in _chain_types(conf)]
        # a plugin not installed at all is the conflist check's to report
        bad = [p for p in found if p.path and p.takes(conf.cni_version) is not True]
        if not bad:
            continue
        common = chain.newest_common(conf.cni_version, found)
        fix = f"set cniVersion to {common}" if common else "no cniVersion suits every plugin: upgrade them"
        (used if index == 0 else others).append(
            f"{conf.path} (cniVersion {conf.cni_version}): {'; '.join(p.describe() for p in bad)} "
            f"[fix: {fix}, or upgrade the plugin]")
    return used, others


def check_chains(node: Node) -> Check:
    used, others = chain_problems(node)
    if used or others:
        return Check("chains", FAIL if used else WARN, " | ".join(used + others),
                     "as each [fix] says (containernetworking-plugins 1.9.1 speak 1.1.0); a plugin that "
                     "rejects the cniVersion fails every ADD, and every DEL before the plugins ahead of it "
                     "see it (they leak); the pybridge node controller picks a version all of them take")
    return Check("chains", OK, "every plugin of every conflist supports its cniVersion")


POOL_WARN = 0.9  # of a range set's addresses in use


def check_pools(node: Node) -> Check:
    """Use per range set from the stores; a full set fails every ADD of its network (code 110),
    while STATUS stays ok (a full pool is not a node fault)."""
    high, unread = [], []
    for _conf, cfg in networks.stores(node.confs):
        held = networks.reserved_ips(cfg)
        if held is None:
            unread.append(cfg.network)
            continue
        high += [u for u in networks.range_use(cfg, held) if u.size and u.used >= POOL_WARN * u.size]
    if high:
        shown = "; ".join(f"network {u.network} {u.subnets}: {u.used} of {u.size} in use" for u in high[:4])
        return Check("pools", WARN, f"range set(s) at {POOL_WARN:.0%} use or more: {shown}",
                     "when full, every ADD fails (code 110): remove stale reservations (`pybridge ls`), "
                     "fewer pods (kubelet maxPods), or a larger pod CIDR")
    if unread:
        return Check("pools", WARN, f"could not read the store of {', '.join(unread)}",
                     "see the stores check")
    return Check("pools", OK, f"every range set below {POOL_WARN:.0%} use")


CHECKS: tuple[Callable[[Node], Check], ...] = (
    check_dirs, check_conflist, check_cni_version, check_chains, check_agent, check_ip_forward,
    check_br_netfilter, check_stores, check_pools, check_attachments, check_mtu, check_masquerade,
    check_network_policy)


def run(node: Node) -> list[Check]:
    results = []
    for check in CHECKS:
        try:
            results.append(check(node))
        except CNIError as exc:  # what the plugin itself would refuse, e.g. an unsafe store
            results.append(Check(_name(check), FAIL, f"could not check: {exc}", "mend what this names first"))
        except Exception as exc:  # a check that cannot run says so; the others still run
            results.append(Check(_name(check), FAIL, f"could not check: {type(exc).__name__}: {exc}",
                                 "report a bug"))
    return results


def _name(check: Callable[[Node], Check]) -> str:
    return check.__name__.removeprefix("check_")


def as_json(results: list[Check]) -> str:
    return json.dumps({"ok": all(c.status != FAIL for c in results), "checks": [asdict(c) for c in results]},
                      indent=2)


def text(results: list[Check]) -> str:
    lines = []
    for c in results:
        lines.append(f"{c.status.upper():<5} {c.name:<13} {c.message}")
        if c.status != OK and c.fix:
            lines.append(f"{'':<19} fix: {c.fix}")
    return "\n".join(lines)
