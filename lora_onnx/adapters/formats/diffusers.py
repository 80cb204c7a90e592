"""diffusers LoRA files (``pytorch_lora_weights.safetensors``): PEFT keys and the older layouts.

- PEFT keys, prefixed by component: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias``,
  ``.lora_magnitude_vector`` with the metadata's ``use_dora`` / ``lora_bias``), ``text_encoder.<path>...``.
  Rank and alpha come from the ``lora_adapter_metadata`` JSON diffusers writes (``unet.r``,
  ``unet.lora_alpha``, ``unet.rank_pattern``...), else from ``<path>.alpha`` keys, else alpha = rank
  (diffusers' own default: scale 1).
- Older keys: ``<path>.lora.down.weight`` / ``.lora.up.weight`` (also ``lora_linear_layer``), and
  attention processors ``<attn>.processor.to_q_lora.down.weight`` (``to_k`` / ``to_v`` / ``to_out``):
  on the UNet they adapt ``<attn>.to_q`` ... ``<attn>.to_out.0``, on text encoders ``q_proj`` ...
  ``out_proj`` (diffusers' UNET_TO_DIFFUSERS and DIFFUSERS_OLD_TO_PEFT tables).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_onnx.adapters.formats.records import OLD_DIFFUSERS, PEFT_DIFFUSERS, LoraFile, LoraModule
from lora_onnx.adapters.peft.config import PeftAdapterConfig, config_from_dict
from lora_onnx.adapters.peft.tensors import SafetensorsFile
from lora_onnx.common import json_input
from lora_onnx.errors import AdapterError

#: First key segments that name a pipeline component.
COMPONENTS = (
    "unet",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "transformer",
    "prior",
    "decoder",
    "controlnet",
)
METADATA_KEY = "lora_adapter_metadata"
_PEFT_PREFIX = "base_model.model."

_PEFT = re.compile(
    r"^(?P<path>.+?)\.(?P<role>lora_A|lora_B|lora_magnitude_vector)(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?"
    r"(?:\.(?P<param>weight|bias))?$"
)
_PEFT_ROLES = {
    ("lora_A", "weight"): "lora_A",
    ("lora_B", "weight"): "lora_B",
    ("lora_B", "bias"): "lora_B.bias",
    ("lora_magnitude_vector", None): "lora_magnitude_vector",
    ("lora_magnitude_vector", "weight"): "lora_magnitude_vector",
}
_PROCESSOR = re.compile(
    r"^(?P<path>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<dir>down|up)\.weight$"
)
_OLD = re.compile(r"^(?P<path>.+?)\.(?:lora|lora_linear_layer)\.(?P<dir>down|up)\.weight$")
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DIRS = {"down": "lora_A", "up": "lora_B"}


def split_component(key: str) -> tuple[str, str]:
    """(component, rest) of a key: ``unet.x`` -> ("unet", "x"); a key without a known prefix -> ("", key)."""
    head, _, rest = key.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return "", key.removeprefix(_PEFT_PREFIX)


def is_old_key(key: str) -> bool:
    return bool(_PROCESSOR.match(key) or _OLD.match(key))


def read_diffusers(weights: SafetensorsFile, unsupported: Any) -> LoraFile:
    """Normalise a diffusers-format file; ``unsupported(key, format)`` raises for keys of other methods."""
    source = str(weights.path)
    roles: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    alpha_keys: dict[tuple[str, str], str] = {}
    old = peft = False
    for key in weights:
        component, rest = split_component(key)
        unsupported(key, "diffusers")
        if rest.endswith(".alpha"):
            alpha_keys[(component, rest.removesuffix(".alpha"))] = key
            continue
        role, path = _role(component, rest)
        if role is None:
            raise AdapterError(
                f"{source}: key {key!r} is not a LoRA tensor of the {PEFT_DIFFUSERS} or {OLD_DIFFUSERS} "
                "format (expected <component>.<module>.lora_A / lora_B.weight, .lora.down / .lora.up.weight "
                "or .processor.to_q_lora.down.weight)"
            )
        if role.startswith("old:"):
            role, old = role[4:], True
        else:
            peft = True
        found = roles[(component, path)]
        if role in found:
            raise AdapterError(f"{source}: keys {found[role]!r} and {key!r} are the same tensor")
        found[role] = key
    if not roles:
        raise AdapterError(f"{source} holds no LoRA tensors")
    configs = _metadata_configs(weights, {component for component, _ in roles})
    modules = []
    for (component, path), found in roles.items():
        for role in ("lora_A", "lora_B"):
            if role not in found:
                raise AdapterError(
                    f"{source}: module {path!r} ({component or 'model'}) has no {role} key "
                    f"(it has {sorted(found.values())})"
                )
        rank = weights.tensors[found["lora_A"]].shape[0]
        alpha_key = alpha_keys.pop((component, path), None)
        config = configs.get(component)
        if alpha_key is not None:
            alpha = _scalar(weights, alpha_key)
        elif config is not None:
            alpha = config.alpha_for(path)
            if config.rank_for(path) != rank:
                raise AdapterError(
                    f"{source}: key {found['lora_A']!r} has rank {rank}, but the file's metadata gives "
                    f"{component}.{path} rank {config.rank_for(path)}"
                )
        else:
            alpha = float(rank)  # diffusers' convention without alphas: W + B @ A
        modules.append(LoraModule(component, path, found, rank, alpha))
    for (_, path), key in alpha_keys.items():
        raise AdapterError(
            f"{source}: key {key!r} is an alpha for module {path!r}, which has no LoRA tensors"
        )
    rslora = frozenset(component for component, config in configs.items() if config.use_rslora)
    return LoraFile(
        weights.path, OLD_DIFFUSERS if old and not peft else PEFT_DIFFUSERS, tuple(modules), weights, rslora
    )


def _role(component: str, rest: str) -> tuple[str | None, str]:
    match = _PEFT.match(rest)
    if match:
        return _PEFT_ROLES.get((match["role"], match["param"])), match["path"]
    match = _PROCESSOR.match(rest)
    if match:
        table = _TEXT_PROJ if component.startswith("text_encoder") else _UNET_PROJ
        return "old:" + _DIRS[match["dir"]], f"{match['path']}.{table[match['proj']]}"
    match = _OLD.match(rest)
    if match:
        return "old:" + _DIRS[match["dir"]], match["path"]
    return None, rest


def _scalar(weights: SafetensorsFile, key: str) -> float:
    info = weights.tensors[key]
    if int(np.prod(info.shape)) != 1:
        raise AdapterError(f"{weights.path}: key {key!r} is an alpha but has shape {info.shape} (one number)")
    value = float(np.asarray(weights.read(key), np.float64).reshape(()))
    if not value > 0:
        raise AdapterError(f"{weights.path}: key {key!r}: alpha {value} must be positive")
    return value


def _metadata_configs(weights: SafetensorsFile, components: set[str]) -> dict[str, PeftAdapterConfig]:
    """Per component, the LoraConfig diffusers saved in the metadata (``<component>.r`` ...)."""
    raw = weights.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    where = Path(f"{weights.path} (metadata {METADATA_KEY})")
    try:
        data = json_input.loads(raw)
    except ValueError as exc:
        raise AdapterError(f"{where}: not readable JSON ({exc})") from exc
    if not isinstance(data, Mapping):
        raise AdapterError(f"{where}: expected a JSON object")
    grouped: dict[str, dict[str, Any]] = defaultdict(dict)
    for name, value in data.items():
        head, _, field = str(name).partition(".")
        if head in components and field:
            grouped[head][field] = value
        elif "" in components:
            grouped[""][str(name)] = value
    return {component: config_from_dict(where, fields) for component, fields in grouped.items()}
