"""nft commands run in this process through libnftables, the library the nft binary is built
on: ADD's one source-check transaction then costs ~1.5 ms instead of ~15 ms for exec'ing nft
(fork, exec, the binary's start), measured side by side on this project's loaded 2-vCPU VM, and
a NetworkPolicy change of the node controller ~8 ms instead of 24-37 ms. Only nft.py calls it
(its in_process path); where the library is missing, nft.py execs nft.

One context is kept for the calling thread's netns (a worker thread inherits it) and made anew
for another: freeing a context closes its nfnetlink socket, and the kernel then flushes
nf_tables' deferred destruction with the commit mutex held (an RCU grace period after a batch
that deleted, nfbatch.py), which CHECK's listing waited for after DEL's teardowns. Calls are
serialised: the library keeps process-wide state, a context is used by one thread at a time,
and the kernel serialises nftables commits anyway. The wait is bounded: a call that does not
return in time fails its caller, and later calls fail to get the lock until it returns.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

from . import netns

_lock = threading.Lock()
_kept: list[tuple[tuple[int, int], int]] = []  # (netns.thread_netns(), context): at most one, under _lock


@cache
def _lib() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    return lib


def available() -> bool:
    return _lib() is not None


NFT_CTX_OUTPUT_JSON = 1 << 4  # libnftables.h


def _context(lib: ctypes.CDLL) -> int | None:
    """The kept context if it was made in this thread's netns, else a new one kept instead."""
    mine = netns.thread_netns()
    if _kept and _kept[0][0] == mine:
        return _kept[0][1]
    while _kept:
        lib.nft_ctx_free(_kept.pop()[1])
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        return None
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    _kept.append((mine, ctx))
    return int(ctx)


def _call(lib: ctypes.CDLL, script: str, json: bool) -> tuple[int, str, str]:
    ctx = _context(lib)
    if ctx is None:
        return 1, "", "libnftables: no context"
    lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON if json else 0)
    code = lib.nft_run_cmd_from_buffer(ctx, script.encode())
    # Reading a buffer empties it for the next run.
    output = lib.nft_ctx_get_output_buffer(ctx) or b""
    error = lib.nft_ctx_get_error_buffer(ctx) or b""
    return code, output.decode(errors="replace"), error.decode(errors="replace")


def run(script: str, timeout: float, json: bool = False) -> tuple[int, str, str]:
    """(exit code, output, error text) of `script` as `nft [-j] -f -` would give them, applied
    in the calling thread's netns. TimeoutError if the library did not answer within `timeout`."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("libnftables is not available")
    if not _lock.acquire(timeout=timeout):
        raise TimeoutError("an earlier libnftables call has not returned")
    answer: list[tuple[int, str, str]] = []

    def call() -> None:
        try:
            answer.append(_call(lib, script, json))
        finally:
            _lock.release()

    worker = threading.Thread(target=call, name="libnftables", daemon=True)
    try:
        worker.start()
    except BaseException:
        _lock.release()
        raise
    worker.join(timeout)
    if not answer:
        raise TimeoutError(f"libnftables did not answer within {timeout:g} s")
    return answer[0]
