"""Defer loading sympy until something uses it.

onnx-ir (the graph layer) imports sympy for symbolic shape arithmetic (``SymbolicDim`` sums and products,
its expression parser), which lora-onnx never does: loading it costs about 35 MB of memory and 0.2 s on
every command. A stand-in module takes sympy's place in ``sys.modules``, with its spec and package path
but none of its code: ``import sympy`` (onnx-ir's, torch's, a user's) binds it, and the first attribute
read that it lacks (``sympy.Max``) runs sympy's real ``__init__`` in it, so it *is* sympy from then on.
onnx-ir's expression parser module, whose top level reads sympy attributes, gets the same treatment.
Nothing is deferred when a module is already loaded or is not found (another onnx-ir layout).

(:class:`importlib.util.LazyLoader` cannot do this on Python 3.11: the import system reads ``__spec__``
on every ``import`` of a module, which loads a lazy one.)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import types
from importlib.machinery import ModuleSpec
from typing import Any

#: Top-level modules, then (parent, submodule) pairs found without importing the parent.
DEFERRED = ("sympy",)
DEFERRED_SUBMODULES = (("onnx_ir", "_symbolic_shapes"),)

_LOCK = threading.RLock()
_LOADED = "_lora_onnx_loaded"


class _Deferred(types.ModuleType):
    """A module whose code runs on the first read of an attribute it does not have. A package keeps its
    ``__path__``: a submodule imported first (``import sympy.core``) loads on its own, as Python allows,
    and the package's own code runs on its first attribute read."""

    def __getattr__(self, attr: str) -> Any:
        with _LOCK:
            state = self.__dict__
            if not state.get(_LOADED):
                state[_LOADED] = True
                spec: ModuleSpec = state["__spec__"]
                assert spec.loader is not None
                spec.loader.exec_module(self)
                if attr in state:
                    return state[attr]
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


def defer() -> None:
    """Register a stand-in for each of :data:`DEFERRED` and :data:`DEFERRED_SUBMODULES` not loaded yet."""
    for name in DEFERRED:
        if name not in sys.modules:
            _install(name, importlib.util.find_spec(name))
    for parent, child in DEFERRED_SUBMODULES:
        name = f"{parent}.{child}"
        if parent in sys.modules or name in sys.modules:
            continue  # the parent has loaded its submodule already
        parent_spec = importlib.util.find_spec(parent)  # a top-level spec: the package is not imported
        locations = parent_spec.submodule_search_locations if parent_spec else None
        if locations:
            _install(name, importlib.machinery.PathFinder.find_spec(name, list(locations)))


def _install(name: str, spec: ModuleSpec | None) -> None:
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _Deferred
    sys.modules[name] = module
