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
