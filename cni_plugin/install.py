"""Write the exec'd launchers: `python -m cni_plugin.install --bin-dir /opt/cni/bin`.

Each launcher starts this interpreter by absolute path with -I -S (no pyenv shim, no site, no
PYTHON* variables from the runtime) and runs the stdlib-only shim, which forwards to the agent
or falls back to serving the call in-process with the paths given here.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig

import cni_plugin

PROGRAMS = ("pybridge", "pyipam")


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
        "from cni_plugin.agent.shim import main\n"
        f"main({program!r})\n"
    )


def write_launchers(bin_dir: str, python: str | None = None) -> list[str]:
    """Install atomically (temp + rename): a runtime may exec the old file meanwhile."""
    python = python or sys.executable
    if not os.path.isabs(python):
        raise ValueError(f"interpreter path must be absolute: {python}")
    os.makedirs(bin_dir, exist_ok=True)
    written = []
    for program in PROGRAMS:
        target = os.path.join(bin_dir, program)
        tmp = os.path.join(bin_dir, f".{program}.tmp")
        with open(tmp, "w") as f:
            f.write(launcher(program, python, import_paths()))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="install the pybridge and pyipam launchers")
    parser.add_argument("--bin-dir", default="/opt/cni/bin")
    args = parser.parse_args()
    for path in write_launchers(args.bin_dir):
        print(path)


if __name__ == "__main__":
    main()
