"""Node objects from the API server through the official Kubernetes client: list, then watch.

Yields ("SYNC", [node objects]) after every list and (event type, node object) for each watch
event, objects in the API's JSON form (the watch's raw objects; list items serialized back).
A watch ends after `timeout_seconds` (a resync: list again) or on 410 Gone (list again).
`list_watch` does the same for any kind (netpol/ watches NetworkPolicy, Pod, Namespace).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, config, watch

Event = tuple[str, Any]


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster config (the DaemonSet's service account), else a kubeconfig for development."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return client.ApiClient(cfg)


def node_events(api: client.ApiClient, timeout_seconds: int = 60,
                stop: Callable[[], bool] = lambda: False,
                backoff: Callable[[float], None] = time.sleep,
                report: Callable[[Exception], None] = lambda _exc: None) -> Iterator[Event]:
    return list_watch(api, client.CoreV1Api(api).list_node, timeout_seconds, stop, backoff, report)


def list_watch(api: client.ApiClient, lister: Callable[..., Any], timeout_seconds: int = 60,
               stop: Callable[[], bool] = lambda: False,
               backoff: Callable[[float], None] = time.sleep,
               report: Callable[[Exception], None] = lambda _exc: None) -> Iterator[Event]:
    """The events of one kind; `lister` is the client's list call for it (e.g. CoreV1Api.list_node).
    `report` hears of every refused call (401, 403...) before the retry."""
    while not stop():
        try:
            listed = lister()
            yield "SYNC", [api.sanitize_for_serialization(item) for item in listed.items]
            version = listed.metadata.resource_version if listed.metadata else None
            w = watch.Watch()
            for event in w.stream(lister, resource_version=version, timeout_seconds=timeout_seconds,
                                  allow_watch_bookmarks=True):
                kind = event["type"]
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    yield kind, event["raw_object"]
                if stop():
                    w.stop()
                    return
        except client.ApiException as exc:
            if exc.status != 410:  # 410 Gone: our resourceVersion expired, list again at once
                report(exc)
                backoff(2.0)
