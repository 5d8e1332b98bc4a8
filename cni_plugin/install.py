"""Install the exec'd entries:
`python -m cni_plugin.install --bin-dir /opt/cni/bin --libexec-dir /opt/pybridge/libexec`.

The Python launchers start this interpreter by absolute path with -I -S (no pyenv shim, no
site, no PYTHON* variables from the runtime) and run the stdlib-only shim, which forwards to
the agent or serves the call in-process. With a libexec dir and gcc, the runtime execs the
compiled client (agent/client.c, ~1 ms to start) instead, which falls back to those launchers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable

import cni_plugin
from cnikit import skel
from cnikit.programs import PROGRAMS

from . import files
from .agent import wire

CLIENT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent", "client.c")


def import_paths() -> list[str]:
    """Where this install's packages live: the project (editable or not) and site-packages."""
    paths = [os.path.dirname(os.path.dirname(os.path.abspath(cni_plugin.__file__)))]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return paths


def launcher(program: str, python: str, paths: list[str]) -> str:
    return (
        f"#!{python} -IS\n"
        "import sys\n"
        f"sys.path[:0] = {paths!r}\n"
        "from cni_plugin.shim import main\n"
        f"main({program!r})\n"
    )


def _install_file(target: str, write: Callable[[str], None]) -> str:
    """A runtime may exec the old file meanwhile: written aside, then renamed over it."""
    def make(tmp: str) -> None:
        write(tmp)
        os.chmod(tmp, 0o755)

    files.replace(target, make)
    return target


def version_defines() -> list[str]:
    """The VERSION answer as the skel writes it, split around the asked version: the client's
    copy is generated from the Python source of truth on every build, never kept by hand."""
    marker = "@ASKED@"
    head, sep, tail = json.dumps(skel.version_reply(marker)).partition(marker)
    if not sep or not (head + tail).isascii():
        raise ValueError("the VERSION answer cannot be split around the asked version")
    # A JSON string of ASCII text is also a C string literal.
    return [f"-DVERSION_HEAD={json.dumps(head)}", f"-DVERSION_TAIL={json.dumps(tail)}",
            f"-DVERSION_CURRENT={json.dumps(skel.version_reply()['cniVersion'])}"]


def wire_defines() -> list[str]:
    """agent/wire.py's constants as WIRE_* for the client: one protocol, written down once."""
    strings = {"REQUEST": wire.REQUEST.decode(), "ACCEPTED": wire.ACCEPTED.decode(), "GO": wire.GO.decode(),
               "RESPONSE": wire.RESPONSE.decode(), "DEFAULT_SOCKET": wire.DEFAULT_SOCKET,
               "SOCKET_ENV": wire.SOCKET_ENV, "ANSWER_TIMEOUT_ENV": wire.ANSWER_TIMEOUT_ENV}
    numbers = {"FLAG_POD_NETNS": f"{wire.FLAG_POD_NETNS}u", "FLAG_ROOT": f"{wire.FLAG_ROOT}u",
               "MAX_STDIN": f"{wire.MAX_STDIN}u", "RESPONSE_HEADER_LEN": str(wire.RESPONSE_HEADER_LEN),
               "ACK_TIMEOUT_MS": str(round(wire.ACK_TIMEOUT * 1000)),
               "ANSWER_TIMEOUT_MS": str(round(wire.ANSWER_TIMEOUT * 1000))}
    return [*(f"-DWIRE_{k}={json.dumps(v)}" for k, v in strings.items()),
            *(f"-DWIRE_{k}={v}" for k, v in numbers.items())]


def build_client(output: str, fallback_dir: str) -> None:
    """Compile agent/client.c with the launchers' directory baked in as its fallback."""
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", f'-DFALLBACK_DIR="{fallback_dir}"',
                    *version_defines(), *wire_defines(), "-o", output, CLIENT_SOURCE], check=True)


def write_launchers(bin_dir: str, python: str | None = None) -> list[str]:
    python = python or sys.executable
    if not os.path.isabs(python):
        raise ValueError(f"interpreter path must be absolute: {python}")
    os.makedirs(bin_dir, exist_ok=True)

    def writer(program: str) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(launcher(program, python, import_paths()))
        return write

    return [_install_file(os.path.join(bin_dir, p), writer(p)) for p in PROGRAMS]


def install(bin_dir: str, libexec_dir: str | None = None, python: str | None = None) -> list[str]:
    """Without a libexec dir (or without gcc) the Python launchers go straight into bin_dir."""
    if libexec_dir is None or shutil.which("gcc") is None:
        return write_launchers(bin_dir, python)
    fallback_dir = os.path.abspath(libexec_dir)
    write_launchers(fallback_dir, python)
    os.makedirs(bin_dir, exist_ok=True)
    return [_install_file(os.path.join(bin_dir, p), lambda tmp: build_client(tmp, fallback_dir))
            for p in PROGRAMS]


def main() -> None:
    parser = argparse.ArgumentParser(description="install the pybridge and pyipam entries")
    parser.add_argument("--bin-dir", default="/opt/cni/bin")
    parser.add_argument("--libexec-dir", help="where the Python launchers go behind the compiled client")
    args = parser.parse_args()
    for path in install(args.bin_dir, args.libexec_dir):
        print(path)


if __name__ == "__main__":
    main()
