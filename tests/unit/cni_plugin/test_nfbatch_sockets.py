"""nfbatch.send keeps one socket per thread and netns: closing an nfnetlink socket makes the
kernel flush nf_tables' deferred destruction with its commit mutex held, which stalled the
agent's ADDs behind DEL's teardown batches (docs/performance.md). The socket is a fake here; the
netns tier (tests/netns/test_sourcecheck.py) sends real batches through it. NetworkPolicy's
conntrack deletions (conntrack.forget) go on the same kept socket."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from cni_plugin import nfbatch
from cni_plugin.node.netpol import conntrack


class FakeSocket:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[nfbatch.Message]] = []
        self.requests: list[int] = []
        self.closed = False
        self.fail = fail

    def batch(self, messages: list[nfbatch.Message]) -> None:
        assert not self.closed
        if self.fail:
            raise TimeoutError("no answer")
        self.batches.append(messages)

    def request(self, kind: int, _flags: int, _payload: bytes) -> list[tuple[int, bytes]]:
        assert not self.closed
        if self.fail:
            raise TimeoutError("no answer")
        self.requests.append(kind)
        return []  # no entries (and no stats: the filtered dumps)

    def close(self) -> None:
        self.closed = True


class World:
    """The sockets opened, and the calling thread's netns (an inode number)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[FakeSocket] = []
        self.netns = (1, 1)
        self.failing = False
        monkeypatch.setattr(nfbatch, "open_socket", self.open)
        monkeypatch.setattr(nfbatch.netns, "thread_netns", lambda: self.netns)
        monkeypatch.setattr(nfbatch, "_kept", nfbatch._Kept())  # this test's own

    def open(self) -> FakeSocket:
        self.opened.append(FakeSocket(self.failing))
        return self.opened[-1]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


MESSAGE = nfbatch.message(1, 0, "bridge", nfbatch.name(1, "t"))


def test_batches_of_one_thread_go_on_one_socket_left_open(world: World) -> None:
    nfbatch.send([MESSAGE])
    nfbatch.send([MESSAGE, MESSAGE])
    assert len(world.opened) == 1
    assert not world.opened[0].closed
    assert [len(batch) for batch in world.opened[0].batches] == [3, 4]  # begin and end framed


def test_a_failed_batch_closes_its_socket_and_the_next_opens_another(world: World) -> None:
    world.failing = True
    with pytest.raises(TimeoutError):
        nfbatch.send([MESSAGE])
    world.failing = False
    nfbatch.send([MESSAGE])
    assert [sock.closed for sock in world.opened] == [True, False]
    assert world.opened[1].batches


def test_a_thread_in_another_netns_never_uses_the_first_netns_socket(world: World) -> None:
    nfbatch.send([MESSAGE])
    world.netns = (1, 2)
    nfbatch.send([MESSAGE])
    assert len(world.opened) == 2
    assert world.opened[0].closed and len(world.opened[0].batches) == 1
    assert len(world.opened[1].batches) == 1


def test_each_thread_has_its_own_socket(world: World) -> None:
    nfbatch.send([MESSAGE])
    other = threading.Thread(target=nfbatch.send, args=([MESSAGE],))
    other.start()
    other.join()
    assert len(world.opened) == 2
    assert [len(sock.batches) for sock in world.opened] == [1, 1]


def test_conntrack_deletions_go_on_the_threads_kept_socket_closed_only_after_an_error(world: World) -> None:
    address = ipaddress.ip_address("10.244.0.2")
    assert conntrack.forget([address]) == 0
    nfbatch.send([MESSAGE])
    assert conntrack.forget([address]) == 0
    assert len(world.opened) == 1 and not world.opened[0].closed
    assert len(world.opened[0].requests) == 2 * (1 + 4)  # the stats, then four filtered dumps
    world.opened[0].fail = True  # its answer does not come
    with pytest.raises(TimeoutError):
        conntrack.forget([address])
    nfbatch.send([MESSAGE])
    assert [sock.closed for sock in world.opened] == [True, False]
