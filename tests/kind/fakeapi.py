"""The Kubernetes client talking to recorded Node objects instead of an API server.

The client's urllib3 pool manager is replaced: GET /api/v1/nodes answers a NodeList, and
GET /api/v1/nodes?watch=true streams watch events line by line, both through the client's
real request, deserialization and watch code. No socket is opened.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
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

    def __init__(self, lists: list[dict[str, Any]], watches: list[list[dict[str, Any]] | int]) -> None:
        self.lists = list(lists)
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
        return self._response(json.dumps(self.lists.pop(0) if self.lists else {"items": []}).encode())

    @staticmethod
    def _response(body: bytes) -> urllib3.HTTPResponse:
        return urllib3.HTTPResponse(
            body=_Body(body),
            status=200,
            reason="OK",
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
    node agent's netpol/), each served by its own FakePool."""

    def __init__(self, pools: dict[str, FakePool]) -> None:
        self.pools = pools
        for path, pool in pools.items():
            pool.path = path

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.HTTPResponse:
        return self.pools[urlparse(url).path].request(method, url, **kwargs)
