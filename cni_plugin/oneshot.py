"""Lighten a process that serves one CNI call and exits (no agent took it); what is left of its
cost is mostly pydantic's own import.

- No cyclic garbage collector: the imports and model builds allocate enough to run a dozen
  collections (~10 ms) in a process that exits right after the call anyway.
- No pydantic plugin discovery: pydantic's plugin loader imports `importlib.metadata` (with
  email, zipfile, csv, ~15 ms) to scan entry points for plugins no CNI call uses. A stand-in
  loader that finds none is registered before pydantic is imported; tests/unit/cni_plugin/test_exec_path.py
  fails if pydantic stops looking plugins up through it.
Never for the agents: they are long-lived and may use plugins.
"""

import gc
import sys
import types

PLUGIN_LOADER = "pydantic.plugin._loader"


def _no_plugins() -> tuple[()]:
    return ()


def prepare() -> None:
    gc.disable()
    if PLUGIN_LOADER not in sys.modules:
        loader = types.ModuleType(PLUGIN_LOADER, "pybridge one-shot stand-in: no pydantic plugins")
        loader.get_plugins = _no_plugins  # type: ignore[attr-defined]
        sys.modules[PLUGIN_LOADER] = loader
