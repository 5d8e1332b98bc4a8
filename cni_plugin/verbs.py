"""The plugin's verbs: one short function each, built from the helpers by concern."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any, cast

from cnikit import log
from cnikit.skel import Request
from cnikit.spec.attachments import valid_attachments
from cnikit.spec.errors import INTERNAL, INVALID_CONFIG, INVALID_NETNS, NOT_AVAILABLE, CNIError
from cnikit.spec.result import Interface, Result, parse_result

from . import config, ipam_client, link, netns, nsrecord, plan
from .config import BridgeConf
from .host import Host, Kernel
from .netlink import Link, Netlink


def _load(req: Request) -> BridgeConf:
    return config.load(req.config)


def _host(req: Request) -> Host:
    """The kernel to this call: the caller's (the agent's, a test's fake), else the real one."""
    return cast(Host, req.host) if req.host is not None else Kernel()


def _open_pod_netns(req: Request, host: Host) -> int:
    """A new fd for the pod netns: reopened from the one a forwarding client sent, or by path."""
    if req.netns_fd is not None:
        return host.reopen_netns(req.netns_fd, req.cmd.netns)
    return host.open_netns(req.cmd.netns)


@contextlib.contextmanager
def _pod_netns(req: Request, host: Host) -> Iterator[int]:
    try:
        fd = _open_pod_netns(req, host)
    except netns.NetnsGone:
        raise CNIError(INVALID_NETNS, "failed to open netns",
                       f"{req.cmd.netns}: no such network namespace") from None
    try:
        _refuse_own_netns(req, host, fd)
        yield fd
    finally:
        os.close(fd)


def _refuse_own_netns(req: Request, host: Host, fd: int) -> None:
    """CNI_IFNAME names a link inside the pod: in the plugin's own netns it would name a host link.
    No override: libcni's CNI_NETNS_OVERRIDE is not honoured (docs/configuration.md)."""
    if host.same_netns(fd):
        raise CNIError(INVALID_NETNS, "CNI_NETNS is the plugin's own network namespace", req.cmd.netns)


def _enable_forwarding(host: Host, families: set[int]) -> None:
    if 4 in families:
        host.sysctl_ensure("net/ipv4/ip_forward", "1")
    if 6 in families:
        host.sysctl_ensure("net/ipv6/conf/all/forwarding", "1")


def _undo(logger: log.Logger, what: str, func: Any, *args: Any) -> None:
    """Undo steps must not mask the error that triggered them."""
    try:
        func(*args)
    except Exception as exc:
        logger.warning("undo_failed", step=what, error=str(exc))


def cmd_add(req: Request) -> dict[str, Any]:
    conf = _load(req)
    mac = conf.mac(req.cmd.cni_args)
    ifname, cid = req.cmd.ifname, req.cmd.container_id
    kernel = _host(req)  # `host` is the veth's host end below
    with _pod_netns(req, kernel) as pod_fd, link.netlink(kernel) as ipr, \
            link.open_pod(kernel, pod_fd) as pod, contextlib.ExitStack() as undo:
        if link.find(pod.sock, ifname) is not None:
            raise CNIError(INTERNAL, f"container veth name {ifname!r} already exists", req.cmd.netns)
        # IPAM first: it validates its own config (dataDir, ranges) before any link is touched.
        result = Result(cniVersion=req.cni_version)
        if conf.ipam_type:
            store = nsrecord.data_dir(conf.ipam)
            # first: every reservation has one, whenever this ADD is killed (but the store's
            # first: the IPAM plugin makes the data dir, then the record follows its reservation)
            recorded = store is not None and nsrecord.write(store, conf.name, cid, ifname, req.cmd.netns)
            try:
                result = ipam_client.add(req, conf.ipam_type)
            except BaseException:  # no reservation made (a full pool: kubelet retries, each anew)
                if store is not None and recorded:
                    nsrecord.remove(store, conf.name, cid, ifname)
                raise
            if store is not None and not recorded:
                nsrecord.write(store, conf.name, cid, ifname, req.cmd.netns)
            undo.callback(_undo, req.log, "ipam release", _release_ipam, req, conf)
        todo = plan.plan(conf, result)
        result = todo.result
        bridge = link.ensure_bridge(kernel, ipr, conf.bridge, conf.mtu, conf.promisc_mode, bool(conf.vlan))
        host = link.create_veth(kernel, ipr, pod_fd, ifname, conf.mtu, mac, bridge)
        undo.callback(_undo, req.log, "veth delete", link.delete_link, ipr, host.index)
        link.configure_port(ipr, host, conf.hairpin_mode, conf.port_isolation, conf.vlan)
        pod_link = link.pod_configure(pod, ifname, todo.addrs, todo.routes, conf.enable_dad,
                                      up=not conf.disable_container_interface,
                                      keep_link_local=conf.pod_ipv6_link_local)
        if conf.source_check:
            undo.callback(_undo, req.log, "source check teardown", kernel.port_check_teardown,
                          conf.name, cid, ifname)
            ipv6 = conf.pod_ipv6_link_local or any(a.version == 6 for a in todo.addrs)
            kernel.port_check_setup(conf.name, cid, ifname, host.name, pod_link.mac, todo.addrs, ipv6)
        if conf.is_gateway:
            for gateway in todo.gateways.values():
                link.ensure_gateway(ipr, bridge, gateway, conf.force_address)
            bridge = link.pin_mac(kernel, ipr, bridge)
            _enable_forwarding(kernel, set(todo.gateways))
        if conf.ip_masq and todo.addrs:
            undo.callback(_undo, req.log, "masquerade teardown", kernel.masq_teardown, conf.name, cid, ifname)
            kernel.masq_setup(conf.name, cid, ifname, todo.addrs, conf.ip_masq_backend)
        if not conf.disable_container_interface:
            host = link.wait_oper_up(ipr, host.index)
        if not conf.is_gateway:  # the bridge MAC follows its ports: read it after this one joined
            bridge = link.get(ipr, bridge.index) or bridge
        undo.pop_all()
    result.interfaces = [
        Interface(name=bridge.name, mac=bridge.mac, mtu=bridge.mtu if conf.mtu else None),
        Interface(name=host.name, mac=host.mac, mtu=host.mtu if conf.mtu else None),
        Interface(name=pod_link.name, mac=pod_link.mac, mtu=pod_link.mtu if conf.mtu else None,
                  sandbox=req.cmd.netns),
    ]
    if conf.dns is not None:
        result.dns = conf.dns
    return result.to_version(req.cni_version)


def _delete_pod_link(req: Request, host: Host, bridge: str, want_port: bool) -> str | None:
    """Unplug the pod; with `want_port`, return its host port as the host netns vouches for it
    (link.verified_host_end), for the source check's teardown without a listing; else None."""
    try:
        fd = _open_pod_netns(req, host)
    except netns.NetnsGone:
        return None  # the runtime already removed the netns: nothing left to unplug
    try:
        _refuse_own_netns(req, host, fd)  # else DEL would delete a host link named CNI_IFNAME
        if not want_port and req.removals is None:
            host.run_in(fd, lambda: link.pod_delete(host, req.cmd.ifname))
            return None
        with link.netlink(host) as ipr:  # in the host netns: it vouches for the host end, marks it
            verified = functools.partial(link.verified_host_end, ipr, ipr.nsid(fd))
            end = _unplug(req, host, ipr, fd, bridge, verified)
        return end.name if want_port and end is not None else None
    finally:
        os.close(fd)


def _unplug(req: Request, host: Host, ipr: Netlink, fd: int, bridge: str,
            host_end_of: link.HostEnd) -> Link | None:
    """The pod end deleted, or detached and its removal submitted; its verified host end."""
    ifname = req.cmd.ifname
    if req.removals is None:
        return host.run_in(fd, lambda: link.pod_delete(host, ifname, host_end_of))
    detached = host.run_in(fd, lambda: link.pod_detach(host, ifname, host_end_of))
    if detached is None:
        return None
    pod, end = detached
    if end is not None and link.mark_host_end(ipr, end, bridge):  # swept with the others marked
        req.removals.submit(link.sweeper(host))                    # (cnikit/removals.py)
    else:
        later = os.dup(fd)
        req.removals.submit(lambda: _finish_removal(host, later, pod.index))
    return end


def _finish_removal(host: Host, fd: int, index: int) -> None:
    try:
        host.run_in(fd, lambda: link.pod_delete_index(host, index))
    finally:
        os.close(fd)


def _release_ipam(req: Request, conf: BridgeConf) -> None:
    """The reservation, then its netns record: a failed release keeps the record for the
    collector."""
    ipam_client.delete(req, conf.ipam_type)
    store = nsrecord.data_dir(conf.ipam)
    if store is not None:
        nsrecord.remove(store, conf.name, req.cmd.container_id, req.cmd.ifname)


def cmd_del(req: Request) -> None:
    conf = _load(req)
    host = _host(req)
    port = _delete_pod_link(req, host, conf.bridge, conf.source_check) if req.cmd.netns else None
    if conf.ipam_type:
        _release_ipam(req, conf)
    if conf.ip_masq:
        host.masq_teardown(conf.name, req.cmd.container_id, req.cmd.ifname)
    if conf.source_check:
        host.port_check_teardown(conf.name, req.cmd.container_id, req.cmd.ifname, port, req.removals)


def cmd_check(req: Request) -> None:
    conf = _load(req)
    if conf.prev_result is None:
        raise CNIError(INVALID_CONFIG, "required prevResult missing", "CHECK needs the ADD result")
    prev = parse_result({**conf.prev_result, "cniVersion": req.cni_version}, "prevResult")
    if conf.ipam_type:
        ipam_client.check(req, conf.ipam_type)
    from . import check

    host = _host(req)
    with _pod_netns(req, host) as pod_fd:
        check.verify(host, conf, prev, req.cmd.netns, req.cmd.ifname, pod_fd)
        attachment = (conf.name, req.cmd.container_id, req.cmd.ifname)
        if conf.ip_masq and not host.masq_in_effect(*attachment):
            raise CNIError(INTERNAL, "masquerade rules missing",
                           f"ipMasq is on but no rule exists for {req.cmd.container_id}/{req.cmd.ifname}")
        if conf.source_check and not host.port_check_in_effect(*attachment):
            raise CNIError(INTERNAL, "source check rules missing",
                           f"sourceCheck is on but no port chain is in effect for "
                           f"{req.cmd.container_id}/{req.cmd.ifname}")


def cmd_status(req: Request) -> None:
    """Whether an ADD could succeed for reasons of this node: the bridge can be made or reused,
    the IPAM store written. Never a full pool (that fails the ADD that wants an address):
    containerd 2.x, which calls STATUS on each CRI Status, turns any STATUS error into
    NetworkReady=false, and kubelet then takes the node NotReady and evicts its pods."""
    conf = _load(req)
    with link.netlink(_host(req)) as ipr:
        found = link.find(ipr, conf.bridge)
    if found is not None and found.kind != "bridge":
        raise CNIError(NOT_AVAILABLE, f"{conf.bridge} already exists but is not a bridge: no ADD can succeed",
                       f"kind {found.kind!r}")
    if conf.ipam_type:
        ipam_client.status(req, conf.ipam_type)


def cmd_gc(req: Request) -> None:
    conf = _load(req)
    valid = valid_attachments(req.config)
    host = _host(req)
    errors = host.masq_gc(conf.name, valid) + host.port_check_gc(conf.name, valid)
    if conf.ipam_type:
        errors += ipam_client.gc(req, conf.ipam_type)
    if errors:
        raise CNIError(INTERNAL, "GC finished with errors", "; ".join(errors))


VERBS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}
