"""The served fake API's store (tests/simcluster's API server): several resources under one
resourceVersion counter, each watch seeing only its own resource, 410 Gone after compaction."""

from __future__ import annotations

from typing import Any

from .apiserver import Store


def namespaced(name: str, ns: str = "x", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels}}


def events(store: Store, resource: str, since: int) -> list[tuple[str, str, str]]:
    """(type, name, resourceVersion) of every event after `since`, not waiting for more."""
    out = []
    for event in store.watch(since, 0, lambda: False, resource):
        meta = event["object"].get("metadata", {})
        out.append(
            (event["type"], meta.get("name", event["object"].get("code")), meta.get("resourceVersion"))
        )
    return out


def test_one_counter_and_each_watch_sees_its_own_resource() -> None:
    store = Store()
    store.put("pods", namespaced("a", pod="a"))
    start = int(store.listing("pods")["metadata"]["resourceVersion"])
    store.put("namespaces", {"metadata": {"name": "x"}})
    store.put("pods", namespaced("a", pod="b"))  # same namespace/name: an update
    store.put("pods", namespaced("a", ns="y"))  # another namespace: another pod
    store.remove("pods", "x/a")
    store.remove("pods", "x/missing")  # nothing there: no event
    assert events(store, "pods", start) == [
        ("MODIFIED", "a", "4"),
        ("ADDED", "a", "5"),
        ("DELETED", "a", "6"),
    ]
    assert events(store, "namespaces", start) == [("ADDED", "x", "3")]
    listed = store.listing("pods")
    assert (listed["kind"], listed["metadata"]["resourceVersion"]) == ("PodList", "6")
    assert [o["metadata"]["namespace"] for o in listed["items"]] == ["y"]


def test_a_watch_from_before_a_compaction_gets_410_and_a_fresh_list_watches_on() -> None:
    store = Store()
    store.put("networkpolicies", namespaced("deny"))
    old = int(store.listing("networkpolicies")["metadata"]["resourceVersion"])
    store.put("networkpolicies", namespaced("allow"))
    store.compact()
    assert events(store, "networkpolicies", old) == [("ERROR", 410, None)]
    fresh = int(store.listing("networkpolicies")["metadata"]["resourceVersion"])
    store.remove("networkpolicies", "x/deny")
    assert events(store, "networkpolicies", fresh) == [("DELETED", "deny", str(fresh + 1))]
