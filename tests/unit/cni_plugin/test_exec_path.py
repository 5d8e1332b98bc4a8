"""What an exec'd call imports: the launcher shim only builtins (and the stdlib-free program
registry), the plugin's VERSION path no pydantic, pyroute2 nor structlog."""

from __future__ import annotations

import json
import subprocess
import sys

from cni_plugin.install import import_paths


def _modules(statement: str) -> list[str]:
    code = f"import sys; sys.path[:0] = {import_paths()!r}; {statement}; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout.replace("'", '"')))


def test_the_exec_path_imports_no_heavy_library() -> None:
    forbidden = ("pyroute2", "pydantic", "structlog", "json", "socket", "re")
    assert [m for m in _modules("import cni_plugin.shim") if m.split(".")[0] in forbidden] == []


def test_the_skel_and_the_entries_import_no_model_library() -> None:
    loaded = _modules("import cnikit.skel, cni_plugin.__main__, ipam.__main__")
    assert "cnikit.skel" in loaded
    assert [m for m in loaded if m.split(".")[0] in ("pyroute2", "pydantic", "structlog")] == []


def test_a_one_shot_add_imports_no_plugin_discovery_subprocess_nor_socket() -> None:
    # What no agent's one-shot ADD/DEL (shim -> oneshot.prepare -> verbs) need not pay for.
    loaded = _modules("import cni_plugin.oneshot as o; o.prepare(); import cni_plugin.verbs, ipam.verbs")
    assert "pydantic" in loaded
    assert [m for m in ("importlib.metadata", "email", "subprocess", "socket") if m in loaded] == []


def _run(code: str) -> str:
    code = f"import sys; sys.path[:0] = {import_paths()!r}\n{code}"
    return subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_pydantic_still_looks_plugins_up_through_the_loader_the_one_shot_call_replaces() -> None:
    # If a pydantic upgrade moved the lookup, the stand-in would silently save nothing; if it
    # renamed get_plugins, every one-shot call would fail. Either way this fails first.
    out = _run(
        "import gc, sys\n"
        "from cni_plugin import oneshot\n"
        "oneshot.prepare()\n"
        "calls = []\n"
        "sys.modules[oneshot.PLUGIN_LOADER].get_plugins = lambda: calls.append(1) or ()\n"
        "from pydantic import BaseModel\n"
        "class M(BaseModel):\n"
        "    x: int\n"
        "assert M(x=1).x == 1\n"
        "import pydantic.plugin._loader as real\n"
        "print(len(calls) > 0, gc.isenabled(), real.__doc__)\n"
    )
    assert out.startswith("True False pybridge one-shot stand-in")


def test_the_real_plugin_loader_has_what_the_stand_in_replaces() -> None:
    assert _run("import pydantic.plugin._loader as real; print(callable(real.get_plugins))") == "True"
