"""Recognise a single-file LoRA's format from its keys, refuse other methods by key, pick a component."""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path

from lora_onnx.adapters.formats.diffusers import read_diffusers
from lora_onnx.adapters.formats.kohya import is_kohya_key, read_kohya, resolve_name, unresolved_message
from lora_onnx.adapters.formats.records import KOHYA, LoraFile, LoraModule
from lora_onnx.adapters.peft.config import CONFIG_NAME
from lora_onnx.adapters.peft.tensors import WEIGHTS_NAME, SafetensorsFile
from lora_onnx.errors import AdapterError

SUFFIXES = (".safetensors",)

#: Key fragments of methods that are not a plain LoRA branch (LyCORIS and friends), and what they are.
_OTHER_METHODS = (
    (
        re.compile(r"[._]hada_(w[12]_[ab]|t[12])\b"),
        "LoHa (hada_ keys, a Hadamard product of two low-rank pairs)",
    ),
    (re.compile(r"[._]lokr_(w[12](_[ab])?|t2)\b"), "LoKr (lokr_ keys, a Kronecker product)"),
    (re.compile(r"\.dora_scale$"), "DoRA (dora_scale keys, a weight-normalised LoRA)"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with a CP / Tucker mid tensor (lora_mid keys)"),
    (re.compile(r"\.diff(_b)?$"), "a full weight difference (diff / diff_b keys)"),
    (re.compile(r"\.on_input$"), "IA3 (on_input keys, a learned per-channel scale)"),
    (re.compile(r"[._]ia3_l\b|\.ia3\b"), "IA3 (a learned per-channel scale)"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA (a1 / a2 / b1 / b2 keys)"),
    (re.compile(r"\.oft_(blocks|diag)$|\.oft_R\b|\.boft_R\b"), "OFT / BOFT (an orthogonal rotation)"),
)
_HINT = (
    "lora-onnx applies plain LoRA and LoCon only; merge it into the base in PyTorch (diffusers' "
    "fuse_lora) and export the merged model"
)


def is_lora_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file to read as a single-file LoRA (a ``.safetensors`` file), not the
    weights of a PEFT folder (``adapter_model.safetensors`` beside an ``adapter_config.json``, whose
    alphas are in that config: the folder is read instead)."""
    path = Path(path)
    if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
        return False
    return path.suffix in SUFFIXES and path.is_file()


def refuse_other_methods(key: str, format_name: str, source: str) -> None:
    """An :class:`AdapterError` naming ``key`` when it belongs to a method other than LoRA."""
    for pattern, what in _OTHER_METHODS:
        if pattern.search(key):
            raise AdapterError(f"{source}: key {key!r} is {what} in a {format_name} file, not LoRA; {_HINT}")


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read the header (and alphas) of a single-file LoRA and normalise it (see :mod:`..formats`).

    Everything the file holds must be a LoRA tensor of one recognised format; anything else is an
    :class:`~lora_onnx.errors.AdapterError` naming the key and the format, before any weight is read.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such LoRA file")
    weights = SafetensorsFile(path, scalar_suffixes=(".alpha",))
    source = str(path)
    if not weights.tensors:
        raise AdapterError(f"{source} holds no tensors")

    def unsupported(key: str, format_name: str) -> None:
        refuse_other_methods(key, format_name, source)

    kohya = [key for key in weights if is_kohya_key(key)]
    if kohya:
        return read_kohya(weights, unsupported)
    return read_diffusers(weights, unsupported)


def components(adapter: str | os.PathLike | LoraFile) -> frozenset[str]:
    """The components a LoRA file adapts (``unet``, ``text_encoder``, ``text_encoder_2``...; ``""`` for keys
    without a component prefix, which apply to whatever model is given). A PEFT folder has one: ``""``."""
    if isinstance(adapter, LoraFile):
        return adapter.components
    if is_lora_file(adapter):
        return read_lora_file(adapter).components
    return frozenset({""})


def select_component(lora: LoraFile, component: str, module_paths: Collection[str] | None = None) -> LoraFile:
    """The modules of one component, prefix stripped (component ``""``), kohya names resolved to
    ``module_paths`` (the graph's; required for kohya files).

    The result's :meth:`~LoraFile.peft_keys` are then ``<module.path>.lora_A.weight`` ..., the keys a PEFT
    folder for that component alone would have.
    """
    source = str(lora.path)
    if component not in lora.components:
        raise AdapterError(f"{source}: has no component {component!r}; it adapts {_names(lora.components)}")
    modules = [m for m in lora.modules if m.component == component]
    if lora.format == KOHYA:
        if module_paths is None:
            raise AdapterError(f"{source}: kohya module names resolve only against a model's module paths")
        paths = list(module_paths)
        resolved = []
        for module in modules:
            path = resolve_name(module.path, paths, key=module.first_key, source=source)
            if path is None:
                raise AdapterError(unresolved_message(module, paths, source))
            resolved.append(LoraModule("", path, module.keys, module.rank, module.alpha))
        modules = resolved
    else:
        modules = [LoraModule("", m.path, m.keys, m.rank, m.alpha) for m in modules]
    rslora = frozenset({""}) if component in lora.rslora else frozenset()
    return LoraFile(lora.path, lora.format, tuple(modules), lora.weights, rslora)


def choose_component(lora: LoraFile, module_paths: Collection[str], wanted: str | None = None) -> str:
    """The component to apply to a model with ``module_paths``: ``wanted`` if given, the only one, or the
    one whose modules all match the model's paths; none or several is an error naming the components."""
    found = sorted(lora.components)
    if wanted is not None:
        if wanted not in lora.components:
            raise AdapterError(f"{lora.path}: --component {wanted!r}: the file adapts {_names(found)}")
        return wanted
    if len(found) == 1:
        return found[0]
    paths = list(module_paths)
    fitting = [c for c in found if _fits(lora, c, paths)]
    if len(fitting) == 1:
        return fitting[0]
    which = "none of them matches" if not fitting else f"{_names(fitting)} all match"
    raise AdapterError(
        f"{lora.path}: the file adapts {_names(found)}, and {which} the model's module paths; choose one "
        "with --component NAME (Python: component=NAME)"
    )


def _fits(lora: LoraFile, component: str, paths: list[str]) -> bool:
    """Every module of ``component`` names a module path of the graph (dotted-suffix rules as PEFT keys)."""
    for module in lora.modules:
        if module.component != component:
            continue
        if module.flat:
            try:
                if resolve_name(module.path, paths, key=module.first_key, source=str(lora.path)) is None:
                    return False
            except AdapterError:
                return False
        elif not any(
            p == module.path or p.endswith("." + module.path) or module.path.endswith("." + p) for p in paths
        ):
            return False
    return True


def _names(names: Collection[str]) -> str:
    return ", ".join(repr(n) if n else "'' (no prefix)" for n in sorted(names))
