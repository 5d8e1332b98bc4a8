"""The exec'd entry: forward the call to the agent, or serve it in-process when no agent takes it.

Started as `<absolute python> -I -S`, it imports only builtins (`_socket`, `posix`, `sys`) and
the stdlib-only program registry: `socket` and `json` would cost ~8 ms each (enum, re), two
thirds of a whole forwarded call.
"""

import posix
import sys

from cnikit import programs

from .agent import wire
from .agent.forward import forward, read_all, write_all


def main(program: str = programs.PYBRIDGE) -> None:
    env = posix.environ
    if not env.get(b"CNI_COMMAND") or sys.argv[1:]:
        _in_process(program, None)  # about text, `agent`, `ls`: nothing to forward
    stdin = read_all(0)
    path = env.get(wire.SOCKET_ENV.encode(), wire.DEFAULT_SOCKET.encode())
    reply = forward(program.encode(), stdin, dict(env), path)
    if reply is None:
        _in_process(program, stdin)
    code, out, err = reply  # type: ignore[misc]
    write_all(1, out)
    if err:
        write_all(2, err)
    posix._exit(code)


def _in_process(program: str, stdin: bytes | None) -> None:
    if stdin is not None:  # one CNI call, then exit (not `agent`, `node`, `ls`)
        from . import oneshot

        oneshot.prepare()
    if program == programs.PYIPAM:
        from ipam.__main__ import main as serve
    else:
        from cni_plugin.__main__ import main as serve
    if stdin is None:
        serve()
        sys.exit(0)
    import io

    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        serve()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    _exit_now(code)


def _exit_now(code: object) -> None:
    """End a one-call process without the interpreter's teardown, which frees every module and
    pydantic schema one by one (~25 ms, 15% of a cold ADD); nothing is left to run at exit."""
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 1
    posix._exit(code or 0)
