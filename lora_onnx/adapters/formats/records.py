"""The one internal form every single-file LoRA format is read into (:mod:`lora_onnx.adapters.formats`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from lora_onnx.adapters.peft.tensors import SafetensorsFile

#: Role (as :mod:`lora_onnx.adapters.peft.mapping` names them) -> the PEFT key suffix it is given.
ROLE_SUFFIXES = {
    "lora_A": ".lora_A.weight",
    "lora_B": ".lora_B.weight",
    "lora_B.bias": ".lora_B.bias",
    "lora_magnitude_vector": ".lora_magnitude_vector",
}

#: Format names, as errors and reports give them.
PEFT_DIFFUSERS = "diffusers (PEFT keys)"
OLD_DIFFUSERS = "diffusers (old lora.down / lora.up and attention-processor keys)"
KOHYA = "kohya (sd-scripts)"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of one component.

    ``path`` is the module path inside the component (``down_blocks.0.attentions.0.proj_in``); for kohya
    files it is the underscore name until resolved against a graph (``flat``). ``keys`` maps each role
    (``lora_A``, ``lora_B``, optionally ``lora_B.bias`` / ``lora_magnitude_vector``) to its key in the file.
    The scale is ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA components).
    """

    component: str
    path: str
    keys: Mapping[str, str]
    rank: int
    alpha: float
    flat: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @property
    def first_key(self) -> str:
        return self.keys["lora_A"]


@dataclass(frozen=True)
class LoraFile:
    """A single-file LoRA, normalised: its modules by component (``unet``, ``text_encoder``,
    ``text_encoder_2``...; ``""`` for a file without component prefixes, which applies to the model as is).
    """

    path: Path
    format: str
    modules: tuple[LoraModule, ...]
    weights: SafetensorsFile = field(repr=False, compare=False)
    #: Components whose scale is alpha / sqrt(rank) (diffusers metadata ``use_rslora``).
    rslora: frozenset[str] = frozenset()

    @property
    def components(self) -> frozenset[str]:
        return frozenset(module.component for module in self.modules)

    def peft_keys(self) -> dict[str, str]:
        """Normalised key (``unet.<module.path>.lora_A.weight``; no prefix for component "") -> file key.

        kohya paths are underscore names until :func:`~.detect.select_component` resolves them.
        """
        keys = {}
        for module in self.modules:
            prefix = f"{module.component}." if module.component else ""
            for role, key in module.keys.items():
                keys[prefix + module.path + ROLE_SUFFIXES[role]] = key
        return keys
