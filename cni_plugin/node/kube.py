"""Objects from the API server through the official Kubernetes client: list, then watch.

Yields ("SYNC", [objects]) after every list and (event type, object) for each watch event,
objects as the API's raw JSON (never the client's models: one object a model refuses must not
fail the whole list). A watch ends after `timeout_seconds` (a resync: list again) or on 410 Gone
(list again). Every request has a client read deadline (a watch: a little longer than the
server's `timeoutSeconds`), so a black-holed connection ends in a relist, never a hang; every
failure, 410 included, is retried after an exponential backoff with jitter.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client, config

from .loop import Backoff

Event = tuple[str, Any]

CONNECT_TIMEOUT = 10.0
LIST_READ_TIMEOUT = 60.0
WATCH_READ_GRACE = 15.0  # on top of the server's timeoutSeconds (the server may send nothing until then)
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Probe an idle API connection after 30 s (client-go's keepalive), drop it after 3 more missed.
KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
             (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30), (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
             (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]


class ConfigError(RuntimeError):
    """No way to reach the API server that may be used."""


class MalformedEvent(ValueError):
    """A watch line that is not a JSON event object: the watch starts over with a list."""


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """The explicit `kubeconfig` (development, outside a cluster), else the pod's service
    account. Never $KUBECONFIG or ~/.kube/config: a root agent must not pick up whatever
    credentials its environment happens to hold."""
    cfg = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException as exc:
            raise ConfigError(f"no service account ({SA_DIR}, KUBERNETES_SERVICE_HOST): {exc}; "
                              "outside a cluster give --kubeconfig") from exc
    cfg.socket_options = KEEPALIVE
    return client.ApiClient(cfg)


def lister(api: client.ApiClient, path: str) -> Callable[..., Any]:
    """The list call of the collection at `path` (e.g. /api/v1/nodes) through the client's
    connection pool, TLS and credentials, with the keywords of the generated API classes' calls
    (CoreV1Api.list_node...), answering the raw response as they do with _preload_content=False.
    Those classes are not used: importing them took 2.4-2.5 s on a loaded 2-vCPU node (kubernetes
    37, pydantic models), most of a node controller's start, for a URL each."""

    def call(watch: bool = False, resource_version: str | None = None, timeout_seconds: int | None = None,
             allow_watch_bookmarks: bool = False, _preload_content: bool = False,
             _request_timeout: tuple[float, float] = (CONNECT_TIMEOUT, LIST_READ_TIMEOUT)) -> Any:
        query = {"watch": "true", "allowWatchBookmarks": str(allow_watch_bookmarks).lower()} if watch else {}
        if resource_version:
            query["resourceVersion"] = resource_version
        if timeout_seconds is not None:
            query["timeoutSeconds"] = str(timeout_seconds)
        cfg = api.configuration
        headers = {"Accept": "application/json", "User-Agent": api.user_agent}
        for auth in cfg.auth_settings().values():  # the bearer token, refreshed as the config says
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        url = cfg.host.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
        response = api.rest_client.pool_manager.request(
            "GET", url, headers=headers, preload_content=False,
            timeout=urllib3.Timeout(connect=_request_timeout[0], read=_request_timeout[1]))
        if not 200 <= response.status < 300:
            try:
                body = response.data.decode(errors="replace")[:300]
            finally:
                response.release_conn()
            raise client.ApiException(status=response.status, reason=f"{response.reason}: {body}")
        return response

    return call


def node_events(api: client.ApiClient, timeout_seconds: int = 60,
                stop: Callable[[], bool] = lambda: False,
                backoff: Callable[[float], None] = time.sleep,
                report: Callable[[Exception], None] = lambda _exc: None) -> Iterator[Event]:
    return list_watch(api, lister(api, "/api/v1/nodes"), timeout_seconds, stop, backoff, report)


def _read_json(response: Any) -> Any:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _watch_lines(response: Any) -> Iterator[bytes]:
    try:
        yield from response
    finally:
        response.close()
        response.release_conn()


def _event(line: bytes) -> tuple[str, Any]:
    """(type, object) of one watch line; an ERROR's object is its Status (fields all optional)."""
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise MalformedEvent(f"watch line is not JSON: {line[:100]!r}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise MalformedEvent(f"watch line is not an event: {line[:100]!r}")
    obj = event.get("object")
    return event["type"], obj if isinstance(obj, dict) else {}


def _watch_error(status: dict[str, Any]) -> client.ApiException:
    code = status.get("code")
    reason = f"{status.get('reason', 'watch error')}: {status.get('message', '')}"
    return client.ApiException(status=code if isinstance(code, int) else 0, reason=reason[:300])


def _resource_version(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return version if isinstance(version, str) and version else None


def complaint(exc: Exception) -> tuple[str, dict[str, Any]]:
    """The log event for a failed list or watch: `api_error` for an answer refusing it (401 for a
    bad token, 403 without RBAC, 410 Gone...), `retry` for no usable answer (TLS, refused, timed
    out, garbage)."""
    status = getattr(exc, "status", None)
    if not status:
        return "retry", {"error": str(exc)[:300], "type": type(exc).__name__}
    return "api_error", {"status": status, "reason": str(getattr(exc, "reason", None))[:100],
                         "error": str(exc)[:300]}


def list_watch(api: client.ApiClient, lister: Callable[..., Any], timeout_seconds: int = 60,
               stop: Callable[[], bool] = lambda: False,
               backoff: Callable[[float], None] = time.sleep,
               report: Callable[[Exception], None] = lambda _exc: None,
               delays: Backoff | None = None) -> Iterator[Event]:
    """The events of one kind; `lister` is the list call for it (lister(api, "/api/v1/nodes")).
    `report` hears of every failure (a refusal such as 401 or 403, a transport error, 410)
    before the wait of `backoff`. Never raises: a consumer sees only SYNC and watch events."""
    delays = delays or Backoff()
    while not stop():
        try:
            listed = _read_json(lister(_preload_content=False,
                                       _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT)))
            items = listed.get("items") if isinstance(listed, dict) else None
            if not isinstance(items, list):
                raise MalformedEvent("list answer has no items")
            yield "SYNC", items
            version = _resource_version(listed)
            response = lister(watch=True, resource_version=version, timeout_seconds=timeout_seconds,
                              allow_watch_bookmarks=True, _preload_content=False,
                              _request_timeout=(CONNECT_TIMEOUT, timeout_seconds + WATCH_READ_GRACE))
            started = time.monotonic()
            for line in _watch_lines(response):
                if not line.strip():
                    continue
                kind, obj = _event(line)
                if kind == "ERROR":
                    raise _watch_error(obj)  # 410 Gone among them: list again, after the backoff
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    yield kind, obj
                delays.reset()  # an event arrived: the connection and our resourceVersion are good
                if stop():
                    return
            if time.monotonic() - started >= timeout_seconds / 2:
                delays.reset()  # the server ended the watch at its timeout: a plain resync, at once
                continue
            backoff(delays.next())  # a watch cut short: no relist storm if every one is
        except Exception as exc:  # any failure is a relist, never the end of the agent
            report(exc)
            backoff(delays.next())


class _NoObjects:
    """The answer for a resource the API server does not serve: a list of nothing, or a watch
    that sees nothing until its timeout (then list_watch lists again, as at any resync)."""

    def __init__(self, wait: float, sleep: Callable[[float], object]) -> None:
        self.data = b'{"items": [], "metadata": {}}'
        self.wait, self.sleep = wait, sleep

    def __iter__(self) -> Iterator[bytes]:
        self.sleep(self.wait)
        return iter(())

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def optional(lister: Callable[..., Any], sleep: Callable[[float], object] = time.sleep) -> Callable[..., Any]:
    """`lister` for a custom resource whose CRD may not be installed: a 404 (not served) is no
    objects, not an error (deleting a CRD deletes all its objects). `sleep` waits out an empty
    watch (an Event's wait ends it at once on stop)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return lister(*args, **kwargs)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            return _NoObjects(float(kwargs.get("timeout_seconds") or 0), sleep)
    return call
