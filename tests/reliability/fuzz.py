"""Fuzz worker: `python -m tests.reliability.fuzz exec|agent|atheris N SANDBOX POD_NETNS`.

Run by test_fuzz.py inside a throw-away host netns (`ip netns exec`, which also gives it a
private mount namespace, where /var/lib is covered with a tmpfs so a config without dataDir
writes nowhere real). Every call goes through `skel.run`, the function the exec'd plugin and the
agent both serve calls with; `agent` drives a live agent over its socket with raw frames.
Prints one JSON line of figures; a call "fails" if it raises, hangs (> 10 s), answers a non-zero
exit without a spec error object on stdout, or answers code 999 (an unexpected exception).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from cni_plugin.agent import intake, server, wire
from cnikit import skel

HANG_SECONDS = 10
VERBS = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]


class Hang(BaseException):
    """Raised by the alarm: BaseException, so skel.run's catch-all cannot swallow it."""


def _alarm(_signum: int, _frame: Any) -> None:
    raise Hang


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def bad(self, kind: str, what: object) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {what!r}"[:600])


def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(["", "..", "../../etc", "/etc/passwd", "a\0b", "a\nb", "eth0", "c1", "x" * 300,
                         "\udcff\udcfe", "-rf", "$(id)", "%s%n", "\u202e", "ip=10.0.0.1"]),
    )


def configs(sandbox: str) -> st.SearchStrategy[Any]:
    path = st.one_of(st.sampled_from([f"{sandbox}/data", f"{sandbox}/data/../../x", "relative", "",
                                      f"{sandbox}/x\0y", "/"]), st.integers(), st.none())
    subnet = st.one_of(st.sampled_from(["10.90.0.0/24", "10.90.1.0/30", "fd90::/64", "10.90.0.1/24",
                                        "300.1.1.1/8", "10.90.0.0/33", "::/0", "0.0.0.0/0"]), hostile_text())
    range_ = st.dictionaries(st.sampled_from(["subnet", "rangeStart", "rangeEnd", "gateway", "x"]),
                             st.one_of(subnet, st.integers(), st.none()), max_size=4)
    ipam = st.fixed_dictionaries(
        {"type": st.sampled_from(["pyipam", "host-local", "nope", ""])},
        optional={"ranges": st.one_of(st.lists(st.lists(range_, max_size=2), max_size=3), hostile_text()),
                  "dataDir": path, "resolvConf": path, "lockTimeout": st.one_of(st.floats(), st.integers()),
                  "routes": st.lists(st.dictionaries(st.sampled_from(["dst", "gw"]), subnet), max_size=2),
                  "subnet": subnet})
    anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | hostile_text(),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text(), inner,
                                                                                         max_size=3),
                            max_leaves=8)
    conf = st.fixed_dictionaries(
        {"cniVersion": st.one_of(st.sampled_from(["1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.3.0", "0.2.0",
                                                  "9.9.9", ""]), anything),
         "name": st.one_of(st.sampled_from(["fuzznet", "n2"]), hostile_text(), anything),
         "type": st.sampled_from(["pybridge", "pyipam"])},
        optional={"bridge": st.one_of(st.sampled_from(["br-fuzz", "eth0", "lo"]), hostile_text()),
                  "ipam": st.one_of(ipam, anything), "isGateway": anything, "ipMasq": st.booleans(),
                  "ipMasqBackend": st.one_of(st.sampled_from(["nftables", "iptables"]), anything),
                  "mtu": st.one_of(st.integers(-5, 70000), anything), "vlan": anything,
                  "logFile": path, "prevResult": anything, "runtimeConfig": anything, "args": anything,
                  "capabilities": anything, "cni.dev/valid-attachments": anything, "dns": anything,
                  "hairpinMode": anything, "promiscMode": anything, "enabledad": anything})
    encoded = conf.map(lambda c: json.dumps(c).encode("utf-8", "surrogatepass"))
    return st.one_of(encoded, encoded, encoded, st.binary(max_size=300),
                     anything.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
                     st.sampled_from([b"", b"{", b"\xff\xfe{}", b"[" * 2000 + b"]" * 2000, b'{"a":' * 5000,
                                      b"null", b"{}", b"\x00" * 64]))


def envs(sandbox: str, pod: str) -> st.SearchStrategy[dict[str, str]]:
    """Mostly well-formed CNI_* (so configs get exercised deep), sometimes hostile or missing."""

    def mostly(valid: list[str]) -> st.SearchStrategy[str]:
        # hypothesis favours "simple" choices (the first branch, small integers): an explicit
        # coin keeps the hostile share at about 1 in 8 per variable.
        return st.tuples(st.integers(0, 2**31), st.sampled_from(valid), hostile_text()).map(
            lambda t: t[2] if random.Random(t[0]).random() < 0.125 else t[1])

    netns = mostly([pod, pod, pod, "/proc/self/ns/net", f"{sandbox}/fifo", f"{sandbox}/file", "/nonexistent",
                    "/dev/null"])
    env = st.fixed_dictionaries({
        "CNI_COMMAND": mostly(VERBS),
        "CNI_CONTAINERID": mostly(["c1", "c2", "c3"]),
        "CNI_NETNS": netns,
        "CNI_IFNAME": mostly(["eth0", "eth1", "net1"]),
        "CNI_ARGS": mostly(["", "", "IgnoreUnknown=1;IP=10.90.0.9", "MAC=zz", "K8S_POD_NAME=x;;"]),
        "CNI_PATH": st.sampled_from([f"{sandbox}/bin", "", "/nonexistent"]),
        "PYBRIDGE_LOG_FILE": st.sampled_from(["", "", f"{sandbox}/log", f"{sandbox}/fifo", "rel"]),
    })
    drop = st.sets(st.sampled_from(["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"]), max_size=2)
    return st.tuples(env, st.one_of(st.just(set()), st.just(set()), drop)).map(
        lambda pair: {k: v.replace("\0", "") for k, v in pair[0].items() if k not in pair[1]})


def _verbs(program: str) -> Any:
    return server._verbs_for(program)


def call(program: str, env: dict[str, str], stdin: bytes, tally: Tally) -> int:
    out, err = io.StringIO(), io.StringIO()
    signal.alarm(HANG_SECONDS)
    try:
        code = skel.run(_verbs(program), env, io.BytesIO(stdin), out, program=program, stderr=err)
    except Hang:
        tally.bad("hangs", (program, env, stdin[:200]))
        return -1
    except BaseException as exc:  # anything escaping skel.run is a finding
        tally.bad("tracebacks", (program, env, stdin[:200], repr(exc)))
        return -1
    finally:
        signal.alarm(0)
    check_answer(code, out.getvalue(), err.getvalue(), (program, env, stdin[:200]), tally)
    return code


def check_answer(code: int, stdout: str, stderr: str, what: object, tally: Tally) -> None:
    tally.counts["calls"] += 1
    if code == 0:
        tally.counts["code_0"] += 1
        if stdout:
            try:
                json.loads(stdout)
            except ValueError:
                tally.bad("bad_result_json", what)
        return
    try:
        answer = json.loads(stdout)
    except ValueError:
        tally.bad("failures_without_error_json", (what, stdout[:200]))
        return
    if not (isinstance(answer, dict) and type(answer.get("code")) is int and answer["code"] > 0
            and isinstance(answer.get("msg"), str) and answer["msg"]):
        tally.bad("failures_without_error_json", (what, stdout[:200]))
        return
    tally.counts[f"code_{answer['code']}"] += 1
    if answer["code"] == 999 and answer["msg"] == "internal error":  # skel's catch-all
        tally.bad("tracebacks", (what, stdout[:300], stderr[:300]))


def fuzz_exec(examples: int, sandbox: str, pod: str) -> dict[str, Any]:
    tally = Tally()

    @seed(20261125)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["pybridge", "pyipam"]), envs(sandbox, pod), configs(sandbox))
    def one(program: str, env: dict[str, str], stdin: bytes) -> None:
        if call(program, env, stdin, tally) == 0 and env.get("CNI_COMMAND") == "ADD":
            call(program, {**env, "CNI_COMMAND": "DEL"}, stdin, tally)  # keep the netns bounded

    one()
    # Fixed extremes hypothesis would rarely reach.
    big = b'{"cniVersion":"1.1.0","name":"n","type":"pybridge","x":"' + b"a" * (5 << 20) + b'"}'
    for stdin in (big, b"[" * 100000, b'{"a":' * 200000, b"\xc3\x28" * 1000):
        for verb in ("ADD", "VERSION", "GC"):
            call("pybridge", {"CNI_COMMAND": verb, "CNI_CONTAINERID": "c", "CNI_NETNS": pod,
                              "CNI_IFNAME": "eth0"}, stdin, tally)
    return {"inputs": examples, **tally.counts, "examples": tally.examples}


def _frame(draw: Any, sandbox: str, pod: str) -> bytes:
    env = draw(envs(sandbox, pod))
    blob = b"\0".join(f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items())
    stdin = draw(configs(sandbox))
    program = draw(st.sampled_from([b"pybridge", b"pyipam", b"", b"sh", b"x" * 80]))
    flags = draw(st.sampled_from([0, 1, 2, 3, 3, 0xFFFFFFFF]))
    frame = wire.encode_request(program, blob, stdin, flags)
    mangle = draw(st.sampled_from(["none", "none", "truncate", "garbage", "lengths"]))
    if mangle == "truncate":
        return frame[: draw(st.integers(0, max(0, len(frame) - 1)))]
    if mangle == "garbage":
        return bytes(draw(st.binary(min_size=1, max_size=200)))
    if mangle == "lengths":
        return frame[:4] + draw(st.binary(min_size=16, max_size=16)) + frame[20:]
    return frame


def _whole(frame: bytes) -> bool:
    """Does the frame's header announce exactly the bytes that follow it?"""
    try:
        _, plen, elen, slen = wire.decode_request_header(frame[:wire.HEADER_LEN])
    except ValueError:
        return False
    return len(frame) == wire.HEADER_LEN + plen + elen + slen


def fuzz_agent(examples: int, sandbox: str, pod: str) -> dict[str, Any]:
    """Raw frames to a live agent: it must answer or close, never die or stop serving."""
    tally = Tally()
    path = f"{sandbox}/agent.sock"
    agent = server.Agent(path)
    agent.bind()
    crashed: list[str] = []
    threading.excepthook = lambda args: crashed.append(repr(args.exc_value))
    serving = threading.Thread(target=agent.serve_forever, daemon=True)
    serving.start()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    pod_fd = os.open(pod, os.O_RDONLY)
    null = os.open("/dev/null", os.O_RDONLY)
    root = os.open("/", os.O_PATH | os.O_DIRECTORY)

    def exchange(frame: bytes, fds: list[int], hangup: bool) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(HANG_SECONDS + intake.REQUEST_TIMEOUT)
            s.connect(path)
            s.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(
                fd.to_bytes(4, sys.byteorder) for fd in fds))] if fds else [])
            if hangup:
                return b""
            s.sendall(wire.GO)  # confirms the call in case the agent accepts it
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    @seed(20261126)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: Any) -> None:
        frame = _frame(data.draw, sandbox, pod)
        fds = data.draw(st.sampled_from([[own, pod_fd, root], [own, pod_fd, root], [own, root], [own, pod_fd],
                                         [own], [], [null, null], [pod_fd, own], [own, null, null]]))
        hangup = data.draw(st.booleans()) and data.draw(st.booleans())
        tally.counts["frames"] += 1
        try:
            reply = exchange(frame, fds, hangup)
        except TimeoutError:
            tally.bad("hangs", frame[:200])
            return
        except OSError as exc:
            tally.counts[f"client_{type(exc).__name__}"] += 1
            return
        if reply[:4] == wire.ACCEPTED:
            body = reply[4:]
            if not body and not _whole(frame):
                # Its lengths announce less than was sent: what the agent read as the GO was
                # the rest of the frame, so it dropped the call unconfirmed, as it must.
                tally.counts["accepted_unconfirmed"] += 1
                return
            if body[:4] != wire.RESPONSE:
                tally.bad("accepted_without_response", (frame[:200], reply[:100]))
                return
            out_len = wire.read_u32(body, 8)
            stdout = body[16:16 + out_len].decode(errors="replace")
            check_answer(wire.read_u32(body, 4), stdout, "", frame[:200], tally)
        else:
            tally.counts["declined_or_closed"] += 1

    one()
    # Still serving: a well-formed VERSION call is answered.
    env = b"CNI_COMMAND=VERSION"
    reply = exchange(wire.encode_request(b"pybridge", env, b"{}", wire.FLAG_ROOT), [own, root], False)
    still = reply[:4] == wire.ACCEPTED and b"supportedVersions" in reply
    agent.stop(drain_timeout=5)
    if crashed:
        tally.bad("agent_thread_exceptions", crashed[:3])
    return {"inputs": examples, "still_serving": still, "agent_thread_exceptions": len(crashed),
            **tally.counts, "examples": tally.examples}


def fuzz_atheris(runs: int, sandbox: str, pod: str) -> None:
    """Coverage-guided: libFuzzer mutates bytes that are split into verb, env and stdin."""
    import atheris  # type: ignore[import-not-found,unused-ignore]

    tally = Tally()
    verbs_env = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"]

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        program = "pyipam" if fdp.ConsumeBool() else "pybridge"
        env = {"CNI_COMMAND": VERBS[fdp.ConsumeIntInRange(0, len(VERBS) - 1)], "CNI_NETNS": pod}
        for key in verbs_env[1:]:
            if fdp.ConsumeBool():
                env[key] = fdp.ConsumeUnicodeNoSurrogates(24).replace("\0", "")
        stdin = fdp.ConsumeBytes(fdp.remaining_bytes())
        if call(program, env, stdin, tally) == 0 and env["CNI_COMMAND"] == "ADD":
            call(program, {**env, "CNI_COMMAND": "DEL"}, stdin, tally)
        if tally.counts["tracebacks"] or tally.counts["hangs"] or tally.counts["failures_without_error_json"]:
            raise RuntimeError(tally.examples)

    seed_conf = json.dumps({"cniVersion": "1.1.0", "name": "fuzznet", "type": "pybridge", "bridge": "br-a",
                            "ipam": {"type": "pyipam", "dataDir": f"{sandbox}/data",
                                     "ranges": [[{"subnet": "10.91.0.0/24"}]]}}).encode()
    corpus = f"{sandbox}/corpus"
    os.makedirs(corpus, exist_ok=True)
    with open(f"{corpus}/seed", "wb") as f:
        f.write(b"\x00\x00" + seed_conf)
    with atheris.instrument_imports():
        import cni_plugin.config  # noqa: F401
        import ipam.config  # noqa: F401
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=4096", "-seed=1", corpus], one_input)
    atheris.Fuzz()


def main() -> None:
    mode, count, sandbox, pod = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    signal.signal(signal.SIGALRM, _alarm)
    os.mkfifo(f"{sandbox}/fifo")
    with open(f"{sandbox}/file", "w") as f:
        f.write("not a netns\n")
    started = time.monotonic()
    if mode == "atheris":
        fuzz_atheris(count, sandbox, pod)
        return
    figures = fuzz_exec(count, sandbox, pod) if mode == "exec" else fuzz_agent(count, sandbox, pod)
    figures["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
