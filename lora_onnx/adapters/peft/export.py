"""Export a model's adapter as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

Tensors go back to PEFT's layouts and keys (``base_model.model.<module path>.<role>``, the module path as
the adapter named it when it was imported). An adapter imported from PEFT gets its own adapter_config.json
back unchanged, so PEFT -> ONNX -> PEFT returns the same tensors and config. For an adapter made here
(``inject``) the config is derived from the branches: the most common rank and alpha, ``rank_pattern`` /
``alpha_pattern`` entries for the others, ``target_modules`` listing every module path; a grouped conv's
block-diagonal A is written as PEFT's dense A (zeros off the blocks), which computes the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_onnx.adapters.peft.config import CONFIG_NAME
from lora_onnx.adapters.peft.mapping import PEFT_PREFIX
from lora_onnx.adapters.peft.modules_to_save import read_saved
from lora_onnx.adapters.peft.packed import PACKED_SEP
from lora_onnx.adapters.peft.tensors import WEIGHTS_NAME, encode_safetensors
from lora_onnx.common.atomic import check_outputs, write_file
from lora_onnx.errors import AdapterError, OutputError
from lora_onnx.kinds import kind_of
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord, adapter_names, read_branches, read_peft_config
from lora_onnx.model.save import model_inputs
from lora_onnx.sites.folded_weights import refuse_peft_export


def export_peft_adapter(
    model: ModelLike, directory: str | os.PathLike, *, adapter: str | None = None
) -> Path:
    """Write ``adapter`` (the model's only adapter when None) of ``model`` to ``directory`` as a PEFT adapter.

    Files are written atomically (temporary name, then rename; the config last). Raises
    :class:`~lora_onnx.errors.AdapterError` when the model has no such adapter or a branch has no PEFT form.
    """
    loaded = load_model(model)
    folder = Path(directory)
    check_peft_folder(folder, model_inputs(loaded))  # before any work
    export = peft_export(loaded, adapter)
    write_peft_folder(folder, export.tensors, export.config or derived_config(export.branches))
    return folder


@dataclass(frozen=True)
class PeftExport:
    """One model's adapter in PEFT's form: the state dict, the adapter_config.json it was imported with
    (None for an adapter made here: derive one with :func:`derived_config` from ``branches``), and its
    branch records (``peft_path`` set to the exported module path)."""

    tensors: dict[str, np.ndarray]
    config: dict[str, object] | None
    branches: tuple[BranchRecord, ...]


def check_peft_folder(folder: Path, reads: Sequence[Path]) -> None:
    """Refuse, before any work, a PEFT output folder that is a file or whose files would replace ``reads``."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; the PEFT adapter needs a folder")
    check_outputs([folder / WEIGHTS_NAME, folder / CONFIG_NAME], reads)


def peft_export(loaded: LoadedModel, adapter: str | None = None, *, prefix: str = "") -> PeftExport:
    """``adapter`` (the model's only one when None) of ``loaded`` as a :class:`PeftExport`. ``prefix`` goes
    in front of every module path (a pipeline component's ``"unet."``; paths already under it are kept)."""
    branches = read_branches(loaded.ir_model)
    names = adapter_names(branches)
    if not branches:
        raise AdapterError(f"{loaded.name} carries no LoRA branches to export")
    if adapter is None:
        if len(names) > 1:
            raise AdapterError(f"{loaded.name} carries adapters {', '.join(names)}; choose one to export")
        adapter = names[0]
    chosen = [branch for branch in branches if branch.adapter == adapter]
    if not chosen:
        raise AdapterError(f"{loaded.name} has no adapter {adapter!r}; it has {', '.join(names)}")
    refuse_peft_export(loaded, adapter, (branch.site for branch in chosen))
    chosen = [
        dataclasses.replace(b, peft_path=_prefixed(prefix, b.peft_path or b.module_path)) for b in chosen
    ]
    tensors = peft_tensors(loaded, chosen)
    # modules_to_save go back under the keys they were imported with (the replacing tensors' values).
    for saved in read_saved(loaded.ir_model, adapter):
        key = saved.key
        if prefix and key.startswith(PEFT_PREFIX):
            key = PEFT_PREFIX + _prefixed(prefix, key.removeprefix(PEFT_PREFIX))
        tensors[key] = saved.to_peft(loaded.array(saved.name))
    return PeftExport(tensors, read_peft_config(loaded.ir_model, adapter), tuple(chosen))


def _prefixed(prefix: str, path: str) -> str:
    return path if path.startswith(prefix) else prefix + path


def write_peft_folder(folder: Path, tensors: Mapping[str, np.ndarray], config: Mapping[str, object]) -> None:
    """Write a PEFT adapter folder (each file atomic, the config last)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_file(folder / WEIGHTS_NAME, encode_safetensors(tensors, {"format": "pt"}))
        write_file(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise OutputError(f"cannot write the adapter to {folder}: {exc.strerror or exc}") from exc


def _array(model: LoadedModel, branch: BranchRecord, name: str) -> np.ndarray:
    try:
        return np.asarray(model.array(name))
    except KeyError as exc:
        raise AdapterError(
            f"tensor {name!r} of the branch at node {branch.site!r} ({branch.module_path}) is not stored "
            "in the model (a graph input?); export a model whose adapter is stored as constants"
        ) from exc


def peft_tensors(model: LoadedModel, branches: Sequence[BranchRecord]) -> dict[str, np.ndarray]:
    """PEFT's state dict for ``branches``: one entry per module (nodes sharing tensors share entries)."""
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for branch in branches:
        path = branch.peft_path or branch.module_path
        if PACKED_SEP in path:
            raise AdapterError(
                f"the branch at node {branch.site!r} ({branch.module_path}) is one block branch for the PEFT "
                f"modules {', '.join(path.split(PACKED_SEP))} on a packed projection; PEFT has separate "
                "modules: export the adapter you applied, or apply it to an unpacked export"
            )
        if owner.setdefault(path, branch.a) != branch.a:
            raise AdapterError(
                f"two branches of module {path!r} carry different tensors; PEFT has one per module"
            )
        if branch.gemm_alpha != 1.0:
            raise AdapterError(
                f"the branch at Gemm node {branch.site!r} ({branch.module_path}) also applies the Gemm's "
                f"alpha {branch.gemm_alpha}, which PEFT has no place for"
            )
        prefix = PEFT_PREFIX + path
        a, b = _array(model, branch, branch.a), _array(model, branch, branch.b)
        kind = kind_of(branch.op)
        names = (
            (".lora_embedding_A", ".lora_embedding_B")
            if kind.peft_role == "embedding"
            else (".lora_A.weight", ".lora_B.weight")
        )
        tensors[prefix + names[0]], tensors[prefix + names[1]] = kind.to_peft(a, b, branch)
        if branch.magnitude:
            tensors[prefix + ".lora_magnitude_vector"] = _array(model, branch, branch.magnitude)
        if branch.lora_bias:
            tensors[prefix + ".lora_B.bias"] = _array(model, branch, branch.lora_bias)
    return {key: np.ascontiguousarray(value) for key, value in tensors.items()}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def derived_config(branches: Sequence[BranchRecord]) -> dict[str, object]:
    """An adapter_config.json for branches made by lora-onnx (see the module doc)."""
    modules: dict[str, BranchRecord] = {}
    for branch in branches:
        modules.setdefault(branch.peft_path or branch.module_path, branch)
    rank = Counter(b.rank for b in modules.values()).most_common(1)[0][0]
    alpha = Counter(b.alpha for b in modules.values()).most_common(1)[0][0]
    rslora = _uses_rslora(list(modules.values()))
    dora = {bool(b.magnitude) for b in modules.values()}
    bias = {bool(b.lora_bias) for b in modules.values()}
    if len(dora) > 1 or len(bias) > 1:
        raise AdapterError(
            "the adapter mixes DoRA / lora_bias and plain branches, which one PEFT config cannot express"
        )
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(modules),
        "rank_pattern": {re.escape(p): b.rank for p, b in modules.items() if b.rank != rank},
        "alpha_pattern": {re.escape(p): _number(b.alpha) for p, b in modules.items() if b.alpha != alpha},
        "use_rslora": rslora,
        "use_dora": dora.pop(),
        "lora_bias": bias.pop(),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }


def _uses_rslora(branches: Sequence[BranchRecord]) -> bool:
    plain = all(math.isclose(b.scale, b.alpha / b.rank, rel_tol=1e-6) for b in branches)
    rs = all(math.isclose(b.scale, b.alpha / math.sqrt(b.rank), rel_tol=1e-6) for b in branches)
    if not plain and not rs:
        odd = next(b for b in branches if not math.isclose(b.scale, b.alpha / b.rank, rel_tol=1e-6))
        raise AdapterError(
            f"the branch of {odd.module_path!r} has scale {odd.scale}, neither alpha/r nor alpha/sqrt(r) "
            "for one setting of use_rslora shared by all modules"
        )
    return rs and not plain
