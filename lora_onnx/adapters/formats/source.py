"""What PEFT planning reads from a folder or a single LoRA file: a config and weights, with a strength.

A file's selected component becomes exactly what a PEFT folder would give: keys ``<path>.lora_A.weight``
(a :class:`RemappedWeights` view reading the file's own keys) and a :class:`FileAdapterConfig` whose rank
and alpha are per module. A strength multiplies every alpha (so the scale), as diffusers'
``set_adapters(..., weights)`` multiplies PEFT's scaling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from lora_onnx.adapters.formats.detect import choose_component, is_lora_file, read_lora_file, select_component
from lora_onnx.adapters.formats.records import LoraFile
from lora_onnx.adapters.peft.config import PeftAdapterConfig, read_adapter_config
from lora_onnx.adapters.peft.tensors import SafetensorsFile, TensorInfo, open_adapter_weights
from lora_onnx.errors import AdapterError


@dataclass(frozen=True)
class FileAdapterConfig(PeftAdapterConfig):
    """A PEFT config whose rank and alpha are given per module path (a single-file LoRA's)."""

    ranks: Mapping[str, int] = field(default_factory=dict)
    alphas: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "ranks", MappingProxyType(dict(self.ranks)))
        object.__setattr__(self, "alphas", MappingProxyType(dict(self.alphas)))

    def rank_for(self, path: str) -> int:
        return self.ranks[path] if path in self.ranks else super().rank_for(path)

    def alpha_for(self, path: str) -> float:
        return self.alphas[path] if path in self.alphas else super().alpha_for(path)


class RemappedWeights:
    """A :class:`~lora_onnx.adapters.peft.tensors.SafetensorsFile` seen under other keys (normalised ->
    file key)."""

    def __init__(self, weights: SafetensorsFile, keys: Mapping[str, str]) -> None:
        self.path = weights.path
        self.metadata = weights.metadata
        self._weights, self._keys = weights, dict(keys)
        self.tensors = {
            new: TensorInfo(new, weights.tensors[old].dtype, weights.tensors[old].shape)
            for new, old in keys.items()
        }

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def read(self, key: str) -> np.ndarray:
        return self._weights.read(self._keys[key])

    def file_keys(self, message: str) -> str:
        """``message`` with each normalised key (quoted) replaced by the file's own key."""
        for new, old in self._keys.items():
            message = message.replace(repr(new), repr(old))
        return message


@contextmanager
def file_keys_in_errors(weights: SafetensorsFile | RemappedWeights) -> Iterator[None]:
    """Re-raise an :class:`AdapterError` naming a LoRA file's keys as the file spells them."""
    try:
        yield
    except AdapterError as exc:
        if not isinstance(weights, RemappedWeights):
            raise
        message = weights.file_keys(str(exc))
        if message == str(exc):
            raise
        raise type(exc)(message) from exc


@dataclass(frozen=True)
class OpenedAdapter:
    """An adapter ready for PEFT planning: ``origin`` is the folder or file, ``component`` the file's part."""

    config: PeftAdapterConfig
    weights: SafetensorsFile | RemappedWeights
    origin: Path
    component: str | None = None
    format: str = "peft"


@dataclass(frozen=True)
class PeftRef(os.PathLike):
    """An adapter path with its strength and component (``--peft PATH:STRENGTH --component NAME``).

    It is a path (``os.fspath`` gives ``path``), so it goes wherever an adapter folder does; PEFT
    planning reads the strength and component from it.
    """

    path: Path
    strength: float = 1.0
    component: str | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def check_strength(strength: float, source: object) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise AdapterError(f"{source}: strength must be a finite number >= 0, got {strength!r}")
    if strength < 0:
        raise AdapterError(f"{source}: strength must be >= 0, got {strength!r}")
    return float(strength)


def with_strength(config: PeftAdapterConfig, strength: float) -> PeftAdapterConfig:
    """``config`` with every alpha times ``strength`` (its raw JSON too, so an export gives it back)."""
    if strength == 1.0:
        return config
    raw = dict(config.raw)
    raw["lora_alpha"] = config.lora_alpha * strength
    raw["alpha_pattern"] = {k: v * strength for k, v in config.alpha_pattern.items()}
    changes: dict[str, object] = {
        "lora_alpha": config.lora_alpha * strength,
        "alpha_pattern": raw["alpha_pattern"],
        "raw": raw,
    }
    if isinstance(config, FileAdapterConfig):
        changes["alphas"] = {k: v * strength for k, v in config.alphas.items()}
        raw["alpha_pattern"] = dict(changes["alphas"])  # type: ignore[call-overload]
    return replace(config, **changes)  # type: ignore[arg-type]


def file_config(lora: LoraFile) -> FileAdapterConfig:
    """The PEFT config of a selected component (:func:`~.detect.select_component`)."""
    modules = lora.modules
    ranks = {m.path: m.rank for m in modules}
    alphas = {m.path: m.alpha for m in modules}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    use_dora = any("lora_magnitude_vector" in m.keys for m in modules)
    lora_bias = any("lora_B.bias" in m.keys for m in modules)
    rslora = "" in lora.rslora
    raw = {  # an adapter_config.json equivalent, which export gives back for the folder it writes
        "peft_type": "LORA",
        "r": common,
        "lora_alpha": float(common),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "target_modules": sorted(ranks),
        "use_rslora": rslora,
        "use_dora": use_dora,
        "lora_bias": lora_bias,
        "bias": "none",
    }
    return FileAdapterConfig(
        path=lora.path,
        r=common,
        lora_alpha=float(common),
        use_rslora=rslora,
        use_dora=use_dora,
        lora_bias=lora_bias,
        raw=raw,
        ranks=ranks,
        alphas=alphas,
    )


def open_adapter(
    path: str | os.PathLike,
    module_paths: Callable[[], Collection[str]],
    *,
    component: str | None = None,
    strength: float = 1.0,
) -> OpenedAdapter:
    """A PEFT folder (or a file inside one), or a single-file LoRA (``.safetensors``) for a model with
    ``module_paths()`` (called for files only): its ``component`` (None: chosen by the paths), with
    ``strength``."""
    strength = check_strength(strength, path)
    if is_lora_file(path):
        lora = read_lora_file(path)
        paths = module_paths()
        chosen = choose_component(lora, paths, component)
        selected = select_component(lora, chosen, paths)
        weights = RemappedWeights(lora.weights, selected.peft_keys())
        config = with_strength(file_config(selected), strength)
        return OpenedAdapter(config, weights, Path(path), chosen, lora.format)
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    if component not in (None, ""):
        raise AdapterError(
            f"{folder}: --component {component!r} applies to single-file LoRAs, not PEFT folders"
        )
    config = with_strength(read_adapter_config(folder), strength)
    return OpenedAdapter(config, open_adapter_weights(folder), folder)


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]``: the suffix after the last ':' is a strength only when it parses as a finite
    number >= 0 (so paths holding ':' stay paths); otherwise the whole text is the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            value = float(tail)
        except ValueError:
            return spec, 1.0
        if math.isfinite(value) and value >= 0:
            return head, value
    return spec, 1.0
