"""kohya (sd-scripts) LoRA files: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
/ ``.alpha``; text encoders ``lora_te_`` (SD 1.x / 2.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL).

``lora_down`` is ``(rank, in)`` for a Linear and ``(rank, in, k, k)`` for a conv ("LoCon": a k x k down
and a 1 x 1 up ``(out, rank, 1, 1)``), PEFT's own layouts. The scale is ``alpha / rank`` with
``rank = lora_down.shape[0]``; a module without ``.alpha`` has alpha = rank (scale 1), as sd-scripts.

Module paths: dots became underscores, which cannot be undone from the name alone (``attn1_to_out_0``),
so names are resolved against the graph's module paths (:func:`resolve_name`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from lora_onnx.adapters.formats.diffusers import _scalar
from lora_onnx.adapters.formats.records import KOHYA, LoraFile, LoraModule
from lora_onnx.adapters.peft.tensors import SafetensorsFile
from lora_onnx.common.names import nearest
from lora_onnx.errors import AdapterError

#: kohya name prefix -> component.
PREFIXES = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
_KEY = re.compile(r"^(?P<prefix>lora_unet|lora_te[12]?)_(?P<name>[^.]+)\.(?P<suffix>.+)$")
_ROLES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}


def is_kohya_key(key: str) -> bool:
    return bool(_KEY.match(key))


def read_kohya(weights: SafetensorsFile, unsupported: Callable[[str, str], None]) -> LoraFile:
    """Normalise a kohya file (module paths still underscore names: ``flat``)."""
    source = str(weights.path)
    roles: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    alphas: dict[tuple[str, str], str] = {}
    prefixes: dict[str, set[str]] = defaultdict(set)
    for key in weights:
        unsupported(key, KOHYA)
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"{source}: key {key!r} is not a {KOHYA} LoRA key (lora_unet_ / lora_te_ / lora_te1_ / "
                "lora_te2_ <module>.lora_down.weight / .lora_up.weight / .alpha), though other keys are"
            )
        component = PREFIXES[match["prefix"]]
        prefixes[component].add(match["prefix"])
        where = (component, match["name"])
        suffix = match["suffix"]
        if suffix == "alpha":
            alphas[where] = key
        elif suffix in _ROLES:
            roles[where][_ROLES[suffix]] = key
        else:
            raise AdapterError(
                f"{source}: key {key!r} has suffix {suffix!r}, which is not part of a {KOHYA} LoRA "
                "(lora_down.weight, lora_up.weight, alpha); lora-onnx applies plain LoRA / LoCon only"
            )
    for component, seen in prefixes.items():
        if len(seen) > 1:
            raise AdapterError(f"{source}: keys use both {' and '.join(sorted(seen))}_ for {component}")
    modules = []
    for (component, name), found in roles.items():
        for role, suffix in (("lora_A", "lora_down.weight"), ("lora_B", "lora_up.weight")):
            if role not in found:
                other = next(iter(found.values()))
                raise AdapterError(f"{source}: key {other!r} has no matching .{suffix}")
        rank = weights.tensors[found["lora_A"]].shape[0]
        alpha_key = alphas.pop((component, name), None)
        alpha = _scalar(weights, alpha_key) if alpha_key is not None else float(rank)
        modules.append(LoraModule(component, name, found, rank, alpha, flat=True))
    for key in alphas.values():
        raise AdapterError(f"{source}: key {key!r} is an alpha for a module with no lora_down / lora_up")
    if not modules:
        raise AdapterError(f"{source} holds no LoRA tensors")
    return LoraFile(weights.path, KOHYA, tuple(modules), weights)


def resolve_name(name: str, paths: Iterable[str], *, key: str, source: str) -> str | None:
    """The graph module path whose dots-as-underscores spelling is ``name`` (None: no such path).

    As for PEFT keys, an export may be rooted above or below the model the LoRA was trained on: an exact
    spelling first, then one graph path ending in ``_<name>``, then the longest graph path ``name`` ends
    with. Several graph paths with the chosen spelling are ambiguous: an error naming them.
    """
    flat: dict[str, list[str]] = defaultdict(list)
    for path in dict.fromkeys(paths):
        flat[path.replace(".", "_")].append(path)
    candidates = flat.get(name)
    if candidates is None:
        longer = [p for spelling, ps in flat.items() if spelling.endswith("_" + name) for p in ps]
        if longer:
            candidates = longer
        else:
            shorter = [spelling for spelling in flat if name.endswith("_" + spelling)]
            if not shorter:
                return None
            candidates = flat[max(shorter, key=len)]
    if len(candidates) > 1:
        raise AdapterError(
            f"{source}: kohya key {key!r} is ambiguous: module name {name!r} spells graph modules "
            f"{', '.join(sorted(candidates)[:6])}"
        )
    return candidates[0]


def unresolved_message(module: LoraModule, paths: Sequence[str], source: str) -> str:
    spelled = [p.replace(".", "_") for p in paths]
    hints = nearest(module.path, spelled) if spelled else []
    by_spelling = dict(zip(spelled, paths, strict=True))
    near = ", ".join(by_spelling[h] for h in hints)
    return f"{source}: kohya key {module.first_key!r} matches no module of the graph" + (
        f"; nearest module paths: {near}" if near else " (the graph has no Linear / Conv modules)"
    )
