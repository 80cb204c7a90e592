"""The record of LoRA branches a rewritten model carries, so later commands can fold or export them.

Stored as JSON under the model-level ``metadata_props`` key :data:`MANIFEST_KEY` (valid at every IR
version, ignored by runtimes). One :class:`BranchRecord` per site: which nodes and tensors the branch
added, where it joins the base graph, and what folding it back needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from lora_onnx.common import json_input
from lora_onnx.errors import FoldError, LoraOnnxError

#: A model whose metadata the manifest lives in: onnx-ir's (a stage's) or a ``ModelProto`` (a saved file's).
ModelMetadata = ir.Model | onnx.ModelProto


def metadata_entries(model: ModelMetadata) -> list[tuple[str, str]]:
    if isinstance(model, ir.Model):
        return list(model.metadata_props.items())
    return [(entry.key, entry.value) for entry in model.metadata_props]


def replace_metadata(
    model: ModelMetadata, keep: Callable[[str], bool], key: str | None, value: str = ""
) -> None:
    """Keep the entries whose key ``keep`` accepts, then add ``key`` = ``value`` last (if given)."""
    if isinstance(model, ir.Model):
        props = model.metadata_props
        for name in [name for name in props if not keep(name)]:
            del props[name]
        if key is not None:
            props.pop(key, None)
            props[key] = value
        return
    kept = [entry for entry in model.metadata_props if keep(entry.key)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if key is not None:
        model.metadata_props.add(key=key, value=value)


MANIFEST_KEY = "lora_onnx.model.manifest"
MANIFEST_VERSION = 1
#: Prefix of the metadata keys holding an imported PEFT adapter's adapter_config.json, one per adapter.
PEFT_CONFIG_PREFIX = "lora_onnx.peft_config."
#: Per-adapter metadata that goes with the adapter's last branch: its PEFT config and the record of the base
#: tensors its modules_to_save replaced (:mod:`lora_onnx.adapters.peft.modules_to_save`; a merge keeps the
#: tensors).
ADAPTER_METADATA_PREFIXES = (PEFT_CONFIG_PREFIX, "lora_onnx.modules_to_save.")


@dataclass(frozen=True)
class BranchRecord:
    """One branch as inserted.

    ``source_layout`` is the layout of the *source* initializer ``weight`` relative to the delta:
    ``in,out`` or ``out,in`` for dense branches (after undoing any Transpose chain and Gemm transB),
    ``conv`` for conv branches. ``scale`` is the LoRA scale s; ``gemm_alpha`` the base Gemm's alpha,
    which the branch also applies. ``join`` is the value the branch's Add produces (the base output's
    original name), ``base_join`` the name the base output was renamed to.

    Optional fields (PEFT import; empty in older manifests): ``peft_path`` is the module path as the
    adapter names it (it may differ from ``module_path`` by a wrapper prefix); DoRA branches name their
    ``magnitude`` (PEFT's ``lora_magnitude_vector``, in PEFT's shape) and ``weight_norm`` (the norm of
    ``W + s * delta``, same shape, computed at rewrite time) tensors, the branch multiplying the joined
    output by ``magnitude / weight_norm``; ``lora_bias`` names PEFT's unscaled ``lora_B.bias``; ``base_bias``
    is the value the base node adds as its bias (a MatMul's bias Add input, Gemm C, Conv B), "" if none;
    ``extra_tensors`` lists further constants the branch added (removed with it).
    """

    adapter: str
    site: str
    op: str
    module_path: str
    kind: str
    weight: str
    source_layout: str
    rank: int
    alpha: float
    scale: float
    a: str
    b: str
    scale_tensor: str
    join: str
    base_join: str
    nodes: tuple[str, ...]
    a_group: int = 1
    b_group: int = 1
    base_group: int = 1
    gemm_alpha: float = 1.0
    zero_init: bool = False
    variant: str = "constant"
    peft_path: str = ""
    magnitude: str = ""
    weight_norm: str = ""
    lora_bias: str = ""
    base_bias: str = ""
    extra_tensors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        # Every field is a str, number, bool or tuple of str: a shallow copy is the JSON form (asdict's
        # deep copy costs more than the rest of an LLM's insert).
        return {spec.name: getattr(self, spec.name) for spec in _FIELDS}

    @classmethod
    def from_json(cls, data: object) -> BranchRecord:
        """A record from its JSON form; ``ValueError`` names a missing or mistyped field."""
        if not isinstance(data, dict):
            raise ValueError(f"a branch record must be an object, got {type(data).__name__}")
        values: dict[str, object] = {}
        for spec in dataclasses.fields(cls):
            if spec.name not in data:
                if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                    raise ValueError(f"a branch record has no {spec.name!r}")
                continue
            values[spec.name] = _field_value(spec.name, str(spec.type), data[spec.name])
        return cls(**values)  # type: ignore[arg-type]

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every initializer the branch added (removed when it is folded)."""
        optional = (self.magnitude, self.weight_norm, self.lora_bias, *self.extra_tensors)
        return (self.a, self.b, self.scale_tensor, *(name for name in optional if name))


def _field_value(name: str, kind: str, value: object) -> object:
    """``value`` checked against the field's annotation (JSON gives lists for tuples, ints for floats)."""
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif kind == "bool":
        ok = isinstance(value, bool)
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value  # type: ignore[arg-type]
    if not ok:
        raise ValueError(
            f"branch field {name!r} must be {_KIND_NAMES.get(kind, 'a list of names')}, got {value!r}"
        )
    return value


_FIELDS = dataclasses.fields(BranchRecord)


_KIND_NAMES = {
    "str": "a string",
    "int": "a whole number >= 0",
    "float": "a finite number",
    "bool": "true or false",
}


def read_branches(model: ModelMetadata) -> tuple[BranchRecord, ...]:
    """The branches recorded in ``model``; empty for a model lora-onnx has not rewritten.

    Raises :class:`LoraOnnxError` (one line) when the manifest is not JSON, too deep, of a newer
    version, or has a record with a missing or mistyped field or a variant no plug-in claims
    (:mod:`lora_onnx.variants`).
    """
    for key, text in metadata_entries(model):
        if key == MANIFEST_KEY:
            try:
                data = json_input.loads(text)
                if not isinstance(data, dict) or not isinstance(data.get("branches"), list):
                    raise ValueError('expected an object with a "branches" list')
                version = data.get("version", MANIFEST_VERSION)
                if isinstance(version, bool) or not isinstance(version, int) or version > MANIFEST_VERSION:
                    raise ValueError(
                        f"version {version!r} is not one this lora-onnx reads (up to {MANIFEST_VERSION})"
                    )
                branches = tuple(BranchRecord.from_json(item) for item in data["branches"])
                # Imported here: the variant plug-ins build on this module. Every record must be one
                # plug-in's, or no command can say what to do with it.
                from lora_onnx.variants import resolve

                for branch in branches:
                    resolve(branch)
                return branches
            except ValueError as exc:
                raise LoraOnnxError(
                    f"the model's {MANIFEST_KEY} metadata is unreadable: {exc}; it was not written by this "
                    "lora-onnx or was edited since (start again from the base model)"
                ) from exc
    return ()


def check_branches(model: onnx.ModelProto) -> None:
    """Refuse a manifest whose records name nodes or tensors the graph does not have.

    Such a model was changed after lora-onnx wrote it (an optimizer renamed or removed nodes, or the
    metadata was copied onto another model): folding or exporting its branches would be wrong. Raises
    :class:`FoldError`; a malformed manifest raises :class:`LoraOnnxError` (see :func:`read_branches`).
    """
    branches = read_branches(model)
    if not branches:
        return
    nodes: set[str] = set()
    values: set[str] = set()
    # subgraphs and functions too: a branch inside an If / Loop body or a local function is recorded there
    graphs: list[onnx.GraphProto] = [model.graph]
    bodies: list[list[onnx.NodeProto]] = [list(f.node) for f in model.functions]
    values.update(name for function in model.functions for name in function.input)
    while graphs or bodies:
        if graphs:
            graph = graphs.pop()
            values.update(t.name for t in graph.initializer)
            values.update(v.name for v in graph.input)
            body = list(graph.node)
        else:
            body = bodies.pop()
        for node in body:
            nodes.add(node.name)
            values.update(node.output)
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    for branch in branches:
        missing_nodes = [name for name in branch.nodes if name not in nodes]
        missing_values = [name for name in branch.tensors if name and name not in values]
        if missing_nodes or missing_values:
            what = f"node {missing_nodes[0]!r}" if missing_nodes else f"tensor {missing_values[0]!r}"
            raise FoldError(
                f"the branch {branch.adapter!r} at node {branch.site!r} is not in the graph as recorded (the "
                f"{MANIFEST_KEY} metadata names {what}, which the graph lacks); was the model edited after "
                "lora-onnx rewrote it? Its branches cannot be folded or exported: start again from the base "
                "model"
            )


def write_branches(model: ModelMetadata, branches: tuple[BranchRecord, ...]) -> None:
    """Replace the model's manifest with ``branches`` (removing it when there are none).

    The PEFT config (and modules_to_save record) of an adapter that no longer has a branch goes too, so a
    later adapter of the same name never inherits it.
    """
    live = {prefix + branch.adapter for branch in branches for prefix in ADAPTER_METADATA_PREFIXES}

    def keep(key: str) -> bool:
        return key != MANIFEST_KEY and (not key.startswith(ADAPTER_METADATA_PREFIXES) or key in live)

    if not branches:
        replace_metadata(model, keep, None)
        return
    payload = {"version": MANIFEST_VERSION, "branches": [branch.to_json() for branch in branches]}
    replace_metadata(model, keep, MANIFEST_KEY, json.dumps(payload, separators=(",", ":")))


def adapter_names(branches: tuple[BranchRecord, ...]) -> list[str]:
    return list(dict.fromkeys(branch.adapter for branch in branches))


def write_peft_config(model: ModelMetadata, adapter: str, config: dict[str, object]) -> None:
    """Keep an imported adapter's adapter_config.json (so ``export`` can give it back unchanged)."""
    key = PEFT_CONFIG_PREFIX + adapter
    replace_metadata(model, lambda name: name != key, key, json.dumps(config, sort_keys=True))


def read_peft_config(model: ModelMetadata, adapter: str) -> dict[str, object] | None:
    """The adapter_config.json an adapter was imported with, None for adapters not imported from PEFT."""
    for key, text in metadata_entries(model):
        if key == PEFT_CONFIG_PREFIX + adapter:
            try:
                data = json_input.loads(text)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            except ValueError as exc:
                raise LoraOnnxError(f"the model's {key} metadata is unreadable: {exc}") from exc
            return data
    return None
