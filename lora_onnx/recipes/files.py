"""Recipes from files: a reproducible run's inject options in TOML or JSON, or a PEFT adapter_config.json.

A *native* recipe file uses the command line's option names (``-`` or ``_``)::

    rank = 8                      # --rank
    alpha = 16                    # --alpha
    rslora = false                # --rslora
    target = ["q_proj", "v_proj"] # --target (a list); target_regex = "..." for --target-regex
    exclude = ["lm_head"]         # --exclude; exclude_regex = "..."
    rank_pattern = { "layers\\.0\\..*" = 4 }   # PEFT's first-match rule
    alpha_pattern = {}
    ops = ["gemm", "matmul"]      # or "gemm,matmul"
    init = "default"              # default | gaussian | random
    seed = 0
    name = "default"              # adapter name
    layers_to_transform = [0, 1]  # PEFT's layer filter (with layers_pattern = "layers")
    # how the run proves and finishes each model
    validate = true
    merge = false
    providers = "cpu"
    dims = { batch = 2, sequence = 16 }
    peft = "adapters/my-adapter"  # apply a trained PEFT adapter instead (relative to this file)

A PEFT ``adapter_config.json`` (recognised by ``peft_type``, ``r``, ``lora_alpha`` or ``target_modules``)
is a recipe for a *fresh* adapter with the same shape: ``r``, ``lora_alpha``, ``use_rslora``,
``target_modules`` (a list, or a regex string; ``"all-linear"``), ``exclude_modules``, ``rank_pattern``,
``alpha_pattern``, ``layers_to_transform`` / ``layers_pattern``, ``modules_to_save`` (never targeted) and
``init_lora_weights`` (True, "gaussian", False). Variants a fresh recipe cannot mean (DoRA, lora_bias,
PiSSA/OLoRA/LoftQ inits, target_parameters, layer_replication) are refused naming the key.

Every problem is one :class:`RecipeError` line naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_onnx.common import json_input
from lora_onnx.common.names import nearest
from lora_onnx.errors import LoraOnnxError
from lora_onnx.recipes.config import DEFAULT_ADAPTER, INIT_KINDS, LoraConfig
from lora_onnx.sites.find import OP_KEYS
from lora_onnx.sites.targets import PeftTargetSelector, TargetSelector

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class RecipeError(LoraOnnxError):
    """A recipe file cannot be read, or a key in it is unknown, mistyped or unsupported."""


#: Recipe keys (the command line's option names) -> (accepted Python types, description for errors).
RECIPE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "rank": ((int,), "a whole number"),
    "alpha": ((int, float), "a number"),
    "rslora": ((bool,), "true or false"),
    "target": ((list,), "a list of module names"),
    "target_regex": ((str,), "a regular expression"),
    "exclude": ((list,), "a list of module names"),
    "exclude_regex": ((str,), "a regular expression"),
    "rank_pattern": ((dict,), "a table of regex = rank"),
    "alpha_pattern": ((dict,), "a table of regex = alpha"),
    "ops": ((list, str), "a list (or comma string) of gemm, matmul, conv"),
    "init": ((str,), f"one of {', '.join(INIT_KINDS)}"),
    "seed": ((int,), "a whole number"),
    "name": ((str,), "an adapter name"),
    "layers_to_transform": ((int, list), "a layer index or a list of them"),
    "layers_pattern": ((str, list), "a name or a list of names"),
    "modules_to_save": ((list,), "a list of module names"),
}
#: Keys about the run rather than the adapter.
RUN_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "validate": ((bool,), "true or false"),
    "merge": ((bool,), "true or false"),
    "providers": ((str, list), "cpu, cuda or cpu,cuda"),
    "dims": ((dict,), "a table of dim name = value"),
    "peft": ((str,), "a PEFT adapter folder"),
}
ALL_KEYS = {**RECIPE_KEYS, **RUN_KEYS}
_PEFT_MARKERS = ("peft_type", "r", "lora_alpha", "target_modules")
#: PEFT's shorthand for every Linear / Conv1D except the output layer.
ALL_LINEAR = "all-linear"
#: The output layer PEFT's "all-linear" leaves out (get_output_embeddings() of transformers models).
OUTPUT_LAYER_NAMES = ("lm_head",)
#: Classification heads PEFT's "all-linear" also leaves out for task_type SEQ_CLS.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


@dataclass(frozen=True)
class RecipeFile:
    """A recipe file read and checked: ``options`` uses :data:`ALL_KEYS` names and JSON types.

    ``notes`` explain liberties taken when translating a PEFT config (e.g. ``all-linear``).
    """

    path: Path
    options: Mapping[str, Any]
    kind: str  # "native" or "peft"
    notes: tuple[str, ...] = field(default=())


def load_recipe(path: str | Path) -> RecipeFile:
    """Read a TOML / JSON recipe or a PEFT adapter_config.json (see the module doc)."""
    file = Path(path)
    data = _read_table(file)
    if any(key in data for key in _PEFT_MARKERS):
        options, notes = _from_peft(file, data)
        return RecipeFile(file, options, "peft", notes)
    return RecipeFile(file, _from_native(file, data), "native")


def _read_table(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise RecipeError(f"{file}: no such recipe file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{file}: cannot read it ({exc})") from exc
    as_json = file.suffix.lower() == ".json" or text.lstrip().startswith("{")
    try:
        data = json_input.loads(text) if as_json else tomllib.loads(text)
        json_input.check_depth(data)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{file}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{file}: not valid TOML ({exc})") from exc
    except (json_input.JsonDepthError, RecursionError) as exc:  # tomllib recurses per nesting level too
        raise RecipeError(f"{file}: nested deeper than {json_input.MAX_DEPTH} levels; not a recipe") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise RecipeError(f"{file}: not a readable recipe ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: expected a table of options at the top level")
    return data


def _check_type(file: Path, key: str, value: object, spec: tuple[tuple[type, ...], str]) -> None:
    types, description = spec
    # bool is an int in Python, but `rank = true` is a mistake, not rank 1
    wrong_bool = isinstance(value, bool) and bool not in types
    if wrong_bool or not isinstance(value, types):
        raise RecipeError(f"{file}: key {key!r} must be {description}, got {value!r}")


def _from_native(file: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key == "dim":
            key = "dims"
        if key not in ALL_KEYS:
            close = nearest(key, ALL_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(ALL_KEYS)}"
            raise RecipeError(f"{file}: unknown key {raw_key!r}{hint}")
        _check_type(file, raw_key, value, ALL_KEYS[key])
        options[key] = value
    if "peft" in options:
        options["peft"] = str((file.parent / options["peft"]).resolve())
    _check_values(file, options)
    return options


def _check_values(file: Path, options: Mapping[str, Any]) -> None:
    """Element types inside lists and tables (TOML and JSON only check the container)."""
    for key in ("target", "exclude", "modules_to_save"):
        for item in options.get(key, []):
            if not isinstance(item, str) or not item:
                raise RecipeError(f"{file}: key {key!r} must list module names, got {item!r}")
    layers = options.get("layers_to_transform", [])
    for item in layers if isinstance(layers, list) else [layers]:
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise RecipeError(f"{file}: key 'layers_to_transform' must list layer indices, got {item!r}")
    pattern = options.get("layers_pattern", [])
    for item in pattern if isinstance(pattern, list) else [pattern]:
        if not isinstance(item, str):
            raise RecipeError(f"{file}: key 'layers_pattern' must be names, got {item!r}")
    for key, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
        for name, value in options.get(key, {}).items():
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise RecipeError(f"{file}: {key}[{name!r}] must be a number, got {value!r}")
    for name, value in options.get("dims", {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"{file}: dims[{name!r}] must be a positive whole number, got {value!r}")
    if options.get("layers_to_transform") not in (None, []) and options.get("target_regex") is not None:
        raise RecipeError(
            f"{file}: layers_to_transform filters listed target names, not a regex target (PEFT refuses "
            "this too); put the layer into the regex instead"
        )
    if options.get("layers_pattern") and options.get("layers_to_transform") in (None, []):
        raise RecipeError(f"{file}: layers_pattern needs layers_to_transform (as in PEFT)")
    ops = options.get("ops")
    if ops is not None:
        items = ops.split(",") if isinstance(ops, str) else ops
        for item in items:
            if not isinstance(item, str) or item.strip().lower() not in OP_KEYS:
                raise RecipeError(f"{file}: key 'ops' takes {', '.join(OP_KEYS)}; got {item!r}")


#: PEFT keys that change what an adapter computes in ways a fresh recipe cannot express.
_PEFT_REFUSED = {
    "use_dora": "DoRA is not supported for a fresh adapter; drop use_dora",
    "lora_bias": "lora_bias is not supported for a fresh adapter; drop it",
    "target_parameters": "target_parameters (LoRA on raw parameters) has no ONNX site; drop it",
    "layer_replication": "layer_replication changes the model's layers; drop it",
    "use_qalora": "QALoRA is not supported; drop use_qalora",
}
_PEFT_INITS = {True: "default", "gaussian": "gaussian", False: "random"}


def _from_peft(file: Path, data: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    peft_type = data.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise RecipeError(f"{file}: peft_type {peft_type!r} is not LoRA; only LoRA configs are recipes")
    for key, why in _PEFT_REFUSED.items():
        if data.get(key):
            raise RecipeError(f"{file}: key {key!r} = {data[key]!r}: {why}")
    init = data.get("init_lora_weights", True)
    if not isinstance(init, bool | str) or init not in _PEFT_INITS:
        raise RecipeError(
            f"{file}: key 'init_lora_weights' = {init!r} is not supported for a fresh adapter; use true, "
            '"gaussian" or false'
        )
    options: dict[str, Any] = {"init": _PEFT_INITS[init]}
    notes: list[str] = []
    peft_fields: dict[str, tuple[str, tuple[tuple[type, ...], str]]] = {
        "r": ("rank", RECIPE_KEYS["rank"]),
        "lora_alpha": ("alpha", RECIPE_KEYS["alpha"]),
        "use_rslora": ("rslora", RECIPE_KEYS["rslora"]),
        "rank_pattern": ("rank_pattern", RECIPE_KEYS["rank_pattern"]),
        "alpha_pattern": ("alpha_pattern", RECIPE_KEYS["alpha_pattern"]),
        "layers_to_transform": ("layers_to_transform", RECIPE_KEYS["layers_to_transform"]),
        "layers_pattern": ("layers_pattern", RECIPE_KEYS["layers_pattern"]),
        "modules_to_save": ("modules_to_save", RECIPE_KEYS["modules_to_save"]),
    }
    for key, (option, spec) in peft_fields.items():
        value = data.get(key)
        if value is None or (key in ("rank_pattern", "alpha_pattern", "layers_pattern") and not value):
            continue
        _check_type(file, key, value, spec)
        options[option] = value
    # PEFT's own defaults when a hand-written config leaves them out (saved configs always have them)
    options.setdefault("rank", 8)
    options.setdefault("alpha", 8)
    targets = data.get("target_modules")
    if targets is None:
        raise RecipeError(
            f"{file}: key 'target_modules' is null (PEFT then picks modules by model type); list the modules"
        )
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        options["ops"] = ["gemm", "matmul"]
        heads = OUTPUT_LAYER_NAMES + (SEQ_CLS_HEAD_NAMES if data.get("task_type") == "SEQ_CLS" else ())
        options["exclude"] = list(heads)
        notes.append(
            f"target_modules 'all-linear': every Gemm / MatMul site except {', '.join(heads)} (PEFT leaves "
            "out the output layer); check the sites with lora-onnx inspect"
        )
    elif isinstance(targets, str):
        options["target_regex"] = targets
    elif isinstance(targets, list):
        options["target"] = targets
    else:
        raise RecipeError(f"{file}: key 'target_modules' must be a list or a regex string, got {targets!r}")
    excludes = data.get("exclude_modules")
    if isinstance(excludes, str):
        options["exclude_regex"] = excludes
    elif isinstance(excludes, list):
        options["exclude"] = [*options.get("exclude", []), *excludes]
    elif excludes is not None:
        raise RecipeError(f"{file}: key 'exclude_modules' must be a list or a regex string, got {excludes!r}")
    _check_values(file, options)
    return options, tuple(notes)


def _as_tuple(value: object) -> tuple[Any, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def build_config(options: Mapping[str, Any]) -> LoraConfig:
    """A :class:`LoraConfig` from recipe options (:data:`RECIPE_KEYS` names; run keys are ignored)."""
    ops = options.get("ops", list(OP_KEYS))
    op_items = ops.split(",") if isinstance(ops, str) else ops
    layers = _as_tuple(options.get("layers_to_transform"))
    protected = _as_tuple(options.get("modules_to_save"))
    selector_args = {
        "names": _as_tuple(options.get("target")),
        "regex": options.get("target_regex"),
        "exclude": _as_tuple(options.get("exclude")),
        "exclude_regex": options.get("exclude_regex"),
    }
    targets: TargetSelector
    if layers or protected:
        targets = PeftTargetSelector(
            **selector_args,
            layers=tuple(int(i) for i in layers),
            layers_pattern=_as_tuple(options.get("layers_pattern")),
            protected=protected,
        )
    else:
        targets = TargetSelector(**selector_args)
    alpha = options.get("alpha")
    return LoraConfig(
        rank=options.get("rank", 8),
        alpha=float(alpha) if alpha is not None else None,
        use_rslora=bool(options.get("rslora", False)),
        targets=targets,
        ops=frozenset(str(op).strip().lower() for op in op_items if str(op).strip()),
        init=options.get("init", "default"),
        seed=options.get("seed", 0),
        rank_pattern=dict(options.get("rank_pattern", {})),
        alpha_pattern={k: float(v) for k, v in options.get("alpha_pattern", {}).items()},
        adapter_name=options.get("name", DEFAULT_ADAPTER),
    )


def recipe_digest(options: Mapping[str, Any]) -> str:
    """A short stable hash of the options, so shards of one run can be told from another run's."""
    canonical = json.dumps(options, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
