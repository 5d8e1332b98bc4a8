"""Fake Kubernetes API servers for the node controller, consumed by the real Kubernetes client.

FakePool: the client's urllib3 pool manager is replaced: GET /api/v1/nodes answers a NodeList,
and GET /api/v1/nodes?watch=true streams watch events line by line, both through the client's
real request, deserialization and watch code. No socket is opened.

NodeStore + ApiServer: the same API over HTTPS with bearer-token auth, for a node controller running
in a container (tests/simcluster): nodes with podCIDRs allocated from the pod subnet, and the pods,
namespaces, NetworkPolicies and ClusterNetworkPolicies of the agent's netpol/, each with list and
watch by resourceVersion, 410 Gone after a compaction.
"""

from __future__ import annotations

import copy
import io
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import urllib3
from kubernetes import client

DATA = Path(__file__).parent / "data"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def load_events(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


class _Body(io.BytesIO):
    """A body that reports itself closed at its end, as a socket-backed one does."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data:
            self.close()
        return data


class FakePool:
    """Answers list and watch requests from scripted responses, and records each request."""

    path = "/api/v1/nodes"  # the collection it serves (FakeApi sets others)

    def __init__(self, lists: list[dict[str, Any] | int], watches: list[list[dict[str, Any]] | int]) -> None:
        self.lists = list(lists)  # a list object, or an HTTP status the list is refused with
        self.watches = list(watches)  # a list of events, or an HTTP-style error code for the watch
        self.requests: list[dict[str, list[str]]] = []
        self.on_exhausted: Callable[[], None] = lambda: None

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.HTTPResponse:
        parsed = urlparse(url)
        assert method == "GET" and parsed.path == self.path, (method, url)
        query = parse_qs(parsed.query)
        self.requests.append(query)
        if query.get("watch") == ["True"] or query.get("watch") == ["true"]:
            if not self.watches:
                self.on_exhausted()
                return self._response(b"")
            script = self.watches.pop(0)
            if isinstance(script, int):
                status = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "code": script,
                    "reason": "Expired",
                    "message": "too old resource version",
                }
                body = json.dumps({"type": "ERROR", "object": status}).encode() + b"\n"
                return self._response(body)
            return self._response(b"".join(json.dumps(e).encode() + b"\n" for e in script))
        if not self.lists:
            self.on_exhausted()
        listed = self.lists.pop(0) if self.lists else {"items": []}
        if isinstance(listed, int):
            return self._response(json.dumps(_status(listed, "Refused")).encode(), listed)
        return self._response(json.dumps(listed).encode())

    @staticmethod
    def _response(body: bytes, status: int = 200) -> urllib3.HTTPResponse:
        return urllib3.HTTPResponse(
            body=_Body(body),
            status=status,
            reason="OK" if status == 200 else "Refused",
            preload_content=False,
            headers={"Content-Type": "application/json"},
        )


def api_client(pool: FakePool) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = "http://apiserver.invalid"
    api = client.ApiClient(cfg)
    api.rest_client.pool_manager = pool
    return api


class FakeApi:
    """Several collections at once (e.g. the NetworkPolicy, Pod and Namespace watches of the
    node controller's netpol/), each served by its own FakePool."""

    def __init__(self, pools: dict[str, FakePool]) -> None:
        self.pools = pools
        for path, pool in pools.items():
            pool.path = path

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.HTTPResponse:
        return self.pools[urlparse(url).path].request(method, url, **kwargs)


# --- a served fake: the same Node objects over HTTPS, for a client in a container ----------------


def node_object(
    name: str, internal_ip: str | list[str], pod_cidrs: list[str], runtime_version: str = ""
) -> dict[str, Any]:
    """A Node as kube-apiserver serves it (the fields the node controller and kubectl read); a
    dual-stack node has an InternalIP per family."""
    spec: dict[str, Any] = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)} if pod_cidrs else {}
    internal = [internal_ip] if isinstance(internal_ip, str) else internal_ip
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": spec,
        "status": {
            "addresses": [
                *({"type": "InternalIP", "address": address} for address in internal),
                {"type": "Hostname", "address": name},
            ],
            # every field is required by the client's model, as kubelet always fills them
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": name,
                "containerRuntimeVersion": runtime_version,
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "v1.33.1",
                "kubeletVersion": "v1.33.1",
                "machineID": name,
                "operatingSystem": "linux",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "systemUUID": name,
            },
        },
    }


# kube-apiserver's collections served here: URL path -> (resource, list kind)
COLLECTIONS = {
    "/api/v1/nodes": ("nodes", "NodeList"),
    "/api/v1/pods": ("pods", "PodList"),
    "/api/v1/namespaces": ("namespaces", "NamespaceList"),
    "/apis/networking.k8s.io/v1/networkpolicies": ("networkpolicies", "NetworkPolicyList"),
    "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies": ("clusternetworkpolicies",
                                                                        "ClusterNetworkPolicyList"),
}


def _name(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


class Store:
    """Objects as the API server keeps them, several resources under one resourceVersion counter
    (etcd's revision), so a list of one resource and the watch after it follow the other's changes.

    Every change gets the next resourceVersion and is kept as a watch event; `compact()` drops
    the history, so a watch from an older resourceVersion gets 410 Gone, as after etcd compaction.
    """

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {r: {} for r, _ in COLLECTIONS.values()}
        self.version = 1
        self.oldest = 1  # the oldest resourceVersion a watch may start from
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # (version, resource, type, obj)
        self.changed = threading.Condition()
        self.changed_at = time.monotonic()  # when the last change was made (the event benchmark's start)

    def _record(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        with self.changed:
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.events.append((self.version, resource, kind, copy.deepcopy(obj)))
            self.changed_at = time.monotonic()
            self.changed.notify_all()

    def put(self, resource: str, obj: dict[str, Any]) -> None:
        """Create or replace (ADDED or MODIFIED) the object of the same namespace/name."""
        with self.changed:
            kind = "MODIFIED" if _name(obj) in self.objects[resource] else "ADDED"
            self.objects[resource][_name(obj)] = obj
            self._record(resource, kind, obj)

    def remove(self, resource: str, name: str) -> None:
        """`name` is namespace/name for a namespaced object; nothing happens if it is not there."""
        with self.changed:
            if name in self.objects[resource]:
                self._record(resource, "DELETED", self.objects[resource].pop(name))

    def compact(self) -> None:
        with self.changed:
            self.events.clear()
            self.oldest = self.version + 1

    def listing(self, resource: str = "nodes") -> dict[str, Any]:
        kind = next(k for r, k in COLLECTIONS.values() if r == resource)
        with self.changed:
            return {
                "kind": kind,
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": [copy.deepcopy(o) for o in self.objects[resource].values()],
            }

    def expired(self, since: int) -> bool:
        return since + 1 < self.oldest

    def watch(
        self, since: int, timeout: float, closed: Callable[[], bool], resource: str = "nodes"
    ) -> Iterator[dict[str, Any]]:
        """Events of `resource` after `since` until `timeout`; one ERROR 410 if `since` is older
        than the history."""
        if self.expired(since):
            message = f"too old resource version: {since}"
            yield {"type": "ERROR", "object": {**_status(410, "Expired"), "message": message}}
            return
        deadline = time.monotonic() + timeout
        while not closed():
            with self.changed:
                pending = [(v, k, o) for v, r, k, o in self.events if v > since and r == resource]
                if not pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self.changed.wait(min(left, 0.5))
                    continue
            for version, kind, obj in pending:
                since = version
                yield {"type": kind, "object": obj}


class NodeStore(Store):
    """A Store with kube-controller-manager's podCIDR allocation for its Nodes.

    A node is created without podCIDRs and gets the first free /mask of the pod subnet in a
    second update (the range allocator's order), so an agent sees it join, then get its range.
    A dual-stack pod subnet ("10.70.0.0/16,fd00:10:70::/56", as kind's podSubnet) gives each
    node one range per family, IPv6 ranges /64 (kube-controller-manager's defaults).
    """

    def __init__(self, pod_subnet: str, mask: int = 24) -> None:
        super().__init__()
        subnets = [ipaddress.ip_network(s.strip()) for s in pod_subnet.split(",")]
        self.free = [list(n.subnets(new_prefix=mask if n.version == 4 else 64)) for n in subnets]
        self.nodes = self.objects["nodes"]

    def add(self, name: str, internal_ip: str | list[str], runtime_version: str = "",
            allocate: bool = True) -> None:
        self.put("nodes", node_object(name, internal_ip, [], runtime_version))
        if allocate:
            self.allocate(name)

    def allocate(self, name: str) -> str:
        """The node's first free range of each family; the first one (IPv4 first)."""
        used = {c for o in self.nodes.values() for c in o["spec"].get("podCIDRs", [])}
        cidrs = [str(next(n for n in free if str(n) not in used)) for free in self.free]
        self.nodes[name]["spec"] = {"podCIDR": cidrs[0], "podCIDRs": cidrs}
        self.put("nodes", self.nodes[name])
        return cidrs[0]

    def heartbeat(self) -> None:
        """A status update of some node, as kubelets post them (the object itself unchanged)."""
        if self.nodes:
            self.put("nodes", next(iter(self.nodes.values())))

    def delete(self, name: str) -> None:
        self.remove("nodes", name)


def _status(code: int, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason}


class ApiServer:
    """A NodeStore served over HTTPS with bearer-token auth: list and watch of COLLECTIONS.

    `listen` is a bound socket (made by the caller in whatever netns the clients reach it).
    `tokens` may change at run time (a revoked token gets 401, as a rotated service account does).
    Without `cert` it serves plain HTTP. `blackhole`: watches are accepted and never answered
    (not even headers), as over a connection a firewall silently drops.
    """

    def __init__(self, store: NodeStore, listen: socket.socket, cert: Path | None, key: Path | None,
                 token: str) -> None:
        self.store, self.tokens = store, {token}
        self.requests: list[tuple[str, int]] = []  # (path?query, status), for the tests to read
        self.closing = False
        self.blackhole = False
        self.closed = threading.Event()
        self.generation = 0  # cut() ends every open watch, as an API server restart does
        self.compact_after_list = False  # the next list of nodes is followed by a compaction: 410
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.httpd = ThreadingHTTPServer(listen.getsockname()[:2], Handler, bind_and_activate=False)
        self.httpd.socket.close()
        self.httpd.socket = listen
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.httpd.socket = context.wrap_socket(listen, server_side=True)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        # The Python client sends "bearer <token>": the scheme is case-insensitive (RFC 7235).
        scheme, _, token = (h.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            return self._reply(h, 401, _status(401, "Unauthorized"))
        if url.path not in COLLECTIONS:
            return self._reply(h, 404, _status(404, "NotFound"))
        resource = COLLECTIONS[url.path][0]
        if query.get("watch", "").lower() not in ("true", "1"):
            listing = self.store.listing(resource)
            # a node status update, then compaction: the rv of that list is gone
            if self.compact_after_list and resource == "nodes":
                self.compact_after_list = False
                self.store.heartbeat()
                self.store.compact()
            return self._reply(h, 200, listing)
        since = int(query.get("resourceVersion") or 0)
        if self.blackhole:
            self.requests.append((h.path, 0))
            self.closed.wait()
            return
        self.requests.append((h.path, 410 if self.store.expired(since) else 200))  # 410 rides in the stream
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        generation = self.generation
        events = self.store.watch(
            since,
            float(query.get("timeoutSeconds") or 60),
            lambda: self.closing or self.generation != generation,
            resource,
        )
        try:
            for event in events:
                line = json.dumps(event).encode() + b"\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away

    def _reply(self, h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        self.requests.append((h.path, code))
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def cut(self) -> None:
        self.generation += 1

    def close(self) -> None:
        self.closing = True
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
