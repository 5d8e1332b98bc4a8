"""libnft keeps one libnftables context for the calling thread's netns: freeing one closes its
nfnetlink socket, and the kernel's flush on that close made CHECK wait behind DEL's teardowns
(docs/performance.md). The library is a fake here; the netns tier runs the real one
(tests/netns/test_sourcecheck.py::test_libnftables_answers_as_nft_does)."""

from __future__ import annotations

import pytest

from cni_plugin import libnft


class FakeLib:
    def __init__(self) -> None:
        self.made: list[int] = []
        self.freed: list[int] = []
        self.flags: list[int] = []
        self.output = b""

    def nft_ctx_new(self, _flags: int) -> int:
        self.made.append(100 + len(self.made))
        return self.made[-1]

    def nft_ctx_free(self, ctx: int) -> None:
        self.freed.append(ctx)

    def nft_ctx_buffer_output(self, _ctx: int) -> None: ...

    def nft_ctx_buffer_error(self, _ctx: int) -> None: ...

    def nft_ctx_output_set_flags(self, _ctx: int, flags: int) -> None:
        self.flags.append(flags)

    def nft_run_cmd_from_buffer(self, ctx: int, script: bytes) -> int:
        self.output = f"{ctx}: {script.decode()}".encode()
        return 0

    def nft_ctx_get_output_buffer(self, _ctx: int) -> bytes:
        return self.output

    def nft_ctx_get_error_buffer(self, _ctx: int) -> bytes:
        return b""


@pytest.fixture
def lib(monkeypatch: pytest.MonkeyPatch) -> FakeLib:
    fake = FakeLib()
    monkeypatch.setattr(libnft, "_lib", lambda: fake)
    monkeypatch.setattr(libnft, "_kept", [])
    monkeypatch.setattr(libnft.netns, "thread_netns", lambda: (1, 1))
    return fake


def test_runs_in_one_netns_share_one_context_never_freed(lib: FakeLib) -> None:
    assert libnft.run("list ruleset", 5, json=True) == (0, "100: list ruleset", "")
    assert libnft.run("list tables", 5) == (0, "100: list tables", "")
    assert lib.made == [100] and lib.freed == []
    assert lib.flags == [libnft.NFT_CTX_OUTPUT_JSON, 0]  # a run's JSON output does not stick


def test_a_run_in_another_netns_frees_the_kept_context_for_a_new_one(
    lib: FakeLib, monkeypatch: pytest.MonkeyPatch
) -> None:
    libnft.run("list ruleset", 5)
    monkeypatch.setattr(libnft.netns, "thread_netns", lambda: (1, 2))
    assert libnft.run("list ruleset", 5) == (0, "101: list ruleset", "")
    assert lib.made == [100, 101] and lib.freed == [100]
