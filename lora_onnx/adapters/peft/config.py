"""Read and vet a PEFT ``adapter_config.json``: what the adapter computes, and whether we can reproduce it.

Only the fields that change what a trained LoRA adapter computes at inference matter here: ``r``,
``lora_alpha``, ``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` (PEFT's first-match rule, applied to
the adapter's own module paths), ``use_dora`` and ``lora_bias``. Which modules are adapted comes from the
tensors' keys, not from ``target_modules``. Variants whose inference is not ``y = W x + s * B(A(x))`` (or
DoRA's rescaling of it), and initialisations that also changed the base weights, are refused by name with
what to do instead.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lora_onnx.common import json_input
from lora_onnx.errors import AdapterError
from lora_onnx.sites.targets import pattern_value

CONFIG_NAME = "adapter_config.json"

#: Other PEFT methods, by peft_type, with what to do instead.
_OTHER_METHODS = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "ADALORA": "AdaLoRA",
    "IA3": "IA3",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "VERA": "VeRA",
    "FOURIERFT": "FourierFT",
    "MISS": "MiSS",
    "BONE": "Bone",
}
_CONVERT_HINT = (
    "convert it to a LoRA adapter in Python with peft.save_as_lora(path, peft_model, rank=...) (an "
    "approximation, for methods that support it), or merge it into the base in PyTorch (merge_and_unload) "
    "and export the merged model"
)

#: init_lora_weights values that also rewrote the base weights during training (prefix match).
_MUTATING_INITS = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "lora_ga": "LoRA-GA",
}
_CONVERSION_HINT = (
    "it was trained against base weights that {name} initialisation rewrote, so it does not fit the original "
    "export; save it converted to a plain LoRA with save_pretrained(..., "
    "path_initial_model_for_weight_conversion=<the initial adapter>) and apply that"
)

#: Config fields naming LoRA variants or features whose inference we do not reproduce, and why.
_REFUSED_FIELDS = {
    "use_qalora": "QA-LoRA pools the input before lora_A, which a plain branch does not reproduce",
    "alora_invocation_tokens": (
        "aLoRA (activated LoRA) applies the adapter only after its invocation tokens, which depends on "
        "the input ids"
    ),
    "monteclora_config": "MonteCLoRA samples lora_A perturbations in its forward pass",
    "use_bdlora": "BD-LoRA stores block-diagonal lora_A / lora_B blocks",
    "arrow_config": "Arrow routes between several LoRA experts per token",
    "kasa_config": "KaSA inserts a learned diagonal between lora_A and lora_B and truncates the base weight",
    "layer_replication": "layer_replication duplicates layers, so the model is not the exported one",
    "target_parameters": "target_parameters adapts bare nn.Parameters (e.g. MoE experts), not modules",
    "trainable_token_indices": (
        "trainable_token_indices replaces rows of an embedding (trainable tokens), which is not a LoRA branch"
    ),
}


@dataclass(frozen=True)
class PeftAdapterConfig:
    """The parts of an ``adapter_config.json`` that decide what the adapter computes.

    ``raw`` is the whole file as read, kept so an export can give it back unchanged.
    """

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_pattern", MappingProxyType(dict(self.rank_pattern)))
        object.__setattr__(self, "alpha_pattern", MappingProxyType(dict(self.alpha_pattern)))
        object.__setattr__(self, "raw", MappingProxyType(dict(self.raw)))

    def rank_for(self, path: str) -> int:
        """The rank PEFT gives the module at ``path`` (relative to the model PEFT wrapped)."""
        return int(pattern_value(path, self.rank_pattern, self.r))

    def alpha_for(self, path: str) -> float:
        return float(pattern_value(path, self.alpha_pattern, self.lora_alpha))

    def scale(self, rank: int, alpha: float) -> float:
        """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def read_adapter_config(folder: Path) -> PeftAdapterConfig:
    """Read ``folder/adapter_config.json`` and refuse what cannot be applied (see the module doc)."""
    file = folder / CONFIG_NAME
    try:
        data = json_input.loads(file.read_text())
    except FileNotFoundError as exc:
        raise AdapterError(_missing_config(folder)) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(f"{file}: not a readable JSON adapter config ({exc})") from exc
    except RecursionError as exc:  # json's parser recurses once per nesting level
        raise AdapterError(f"{file}: not a readable JSON adapter config (nested too deeply)") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return config_from_dict(file, data)


def config_from_dict(file: Path, data: Mapping[str, Any]) -> PeftAdapterConfig:
    """An adapter config from its JSON object (``file`` names it in errors), vetted as a file would be."""
    _refuse_unsupported(file, data)
    saved = data.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise AdapterError(
            f"{file}: modules_to_save must be a list of module names or null, got {reprlib.repr(saved)}"
        )
    rank = _positive_int(file, "r", data.get("r", 8))
    alpha = _positive_number(file, "lora_alpha", data.get("lora_alpha", 8))
    rank_pattern = _pattern(file, "rank_pattern", data.get("rank_pattern"), integer=True)
    alpha_pattern = _pattern(file, "alpha_pattern", data.get("alpha_pattern"), integer=False)
    return PeftAdapterConfig(
        path=file,
        r=rank,
        lora_alpha=alpha,
        use_rslora=_flag(file, data, "use_rslora"),
        use_dora=_flag(file, data, "use_dora"),
        lora_bias=_flag(file, data, "lora_bias"),
        rank_pattern=rank_pattern,  # type: ignore[arg-type]
        alpha_pattern=alpha_pattern,
        raw=data,
    )


def _missing_config(folder: Path) -> str:
    if not folder.exists():
        return f"{folder}: no such adapter folder"
    if not folder.is_dir():
        return f"{folder}: not a folder; pass the folder holding adapter_config.json"
    nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
    if nested:
        # PEFT saves adapters other than "default" in subfolders named after them.
        return (
            f"{folder} has no {CONFIG_NAME}, but its subfolders {', '.join(nested)} hold adapters: pass one"
        )
    return f"{folder} has no {CONFIG_NAME}; is it a PEFT adapter folder (model.save_pretrained(...))?"


def _refuse_unsupported(file: Path, data: Mapping[str, Any]) -> None:
    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        name = _OTHER_METHODS.get(peft_type, peft_type)
        raise AdapterError(f"{file}: {name} adapters (peft_type {peft_type}) are not LoRA; {_CONVERT_HINT}")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str):
        lowered = init.lower()
        for prefix, name in _MUTATING_INITS.items():
            if lowered.startswith(prefix):
                hint = _CONVERSION_HINT.format(name=name)
                raise AdapterError(f"{file}: init_lora_weights={init!r}: {hint}")
        if lowered == "loftq" or data.get("loftq_config"):
            raise AdapterError(
                f"{file}: init_lora_weights={init!r}: LoftQ adapters are trained against LoftQ-quantized "
                "base weights, not the exported ones; merge it in PyTorch (merge_and_unload) and export "
                "the merged model"
            )
    for key, why in _REFUSED_FIELDS.items():
        if data.get(key):
            raise AdapterError(f"{file}: {key} is set: {why}; lora-onnx applies plain LoRA and DoRA only")
    bias = data.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(
            f"{file}: bias={bias!r} trains the base model's own biases, which is not a LoRA branch; "
            "retrain with bias='none' (or lora_bias=True), or merge in PyTorch and export the merged model"
        )
    if data.get("use_dora") and data.get("lora_bias"):
        raise AdapterError(f"{file}: use_dora and lora_bias are both set, which PEFT itself rejects")


def _flag(file: Path, data: Mapping[str, Any], key: str) -> bool:
    """A true / false field; "false" (a string) would be truthy in Python, so only JSON booleans pass."""
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterError(f"{file}: {key} must be true or false, got {value!r}")
    return value


def _positive_int(file: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{file}: {key} must be a positive whole number, got {value!r}")
    return value


def _positive_number(file: Path, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{file}: {key} must be a number, got {value!r}")
    return float(value)


def _pattern(file: Path, key: str, value: object, *, integer: bool) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(f"{file}: {key} must be an object mapping module patterns to values")
    pattern: dict[str, float] = {}
    for name, number in value.items():
        try:
            re.compile(name)
        except re.error as exc:
            raise AdapterError(
                f"{file}: {key} key {name!r} is not a valid regular expression: {exc}"
            ) from exc
        pattern[name] = (
            _positive_int(file, f"{key}[{name!r}]", number)
            if integer
            else _positive_number(file, f"{key}[{name!r}]", number)
        )
    return pattern
