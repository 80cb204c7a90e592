"""PEFT adapters on q/k/v projections that onnxruntime's transformer optimizer fused away.

``onnxruntime.transformers.optimizer.optimize_model`` (what Optimum's ``--optimize O2`` runs) replaces a
layer's query, key and value MatMuls (and bias Adds) by one ``com.microsoft.Attention`` node whose input 1
is a packed weight ``(hidden, q + k + v)`` and input 2 the packed bias; the projections' module paths are
gone. The packing (``FusionAttention.create_attention_node``) puts q, k, v side by side along the columns,
in that order, with sizes from the node's ``qkv_hidden_sizes`` attribute or three equal thirds. The
nodes are named ``Attention_<n>`` in the order the fusion made them.

An adapter module that matches no site but names a projection of a numbered layer
(``encoder.layer.3.attention.self.query``, ``model.layers.3.self_attn.q_proj``...) is such a projection:
its layer is the index the modules around the fused node carry (the output projection reading the
Attention's output, ``...layer.3.attention.output.dense``), else the node's position among the graph's
Attention nodes (the n-th is layer n), which is only trusted when no q/k/v projection of that stack is
left unfused. The fused op computes with the packed weight inside, so there is no place for an
unmerged branch: such an adapter is refused with that reason unless it is merged, which adds
``s * (B @ A)^T`` to the projection's column block of the packed weight (PEFT's ``merge_and_unload``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from lora_onnx.errors import AdapterError
from lora_onnx.kinds import kind_of
from lora_onnx.kinds.base import NodeMaker
from lora_onnx.model.graph import (
    FreshNames,
    add_initializer,
    attribute_values,
    nodes_by_name,
    values_by_name,
)
from lora_onnx.model.load import LoadedModel, TensorProducer
from lora_onnx.model.tensors import make_deferred, make_tensor, np_dtype
from lora_onnx.model.values import constant_shape
from lora_onnx.sites.find import SiteScan

if TYPE_CHECKING:
    from lora_onnx.adapters.peft.config import PeftAdapterConfig
    from lora_onnx.adapters.peft.mapping import AdapterModule
    from lora_onnx.adapters.peft.tensors import SafetensorsFile


FUSED_OP = "Attention"
FUSED_DOMAIN = "com.microsoft"
#: Projection module names -> their column block in the packed weight (q, k, v).
PROJECTIONS = {
    "query": 0, "key": 1, "value": 2,  # BERT, RoBERTa, ViT
    "q_proj": 0, "k_proj": 1, "v_proj": 2,  # Llama, BART, OPT, CLIP
    "q_lin": 0, "k_lin": 1, "v_lin": 2,  # DistilBERT
    "q": 0, "k": 1, "v": 2,  # T5
}  # fmt: skip
PARTS = ("query", "key", "value")
FIX = (
    "apply the adapter before optimizing (inject --peft on the unoptimized export), or merge it into the "
    "packed weight (inject --peft DIR --merge)"
)


@dataclass(frozen=True)
class FusedAttention:
    """One fused Attention node: its packed weight and where q, k, v sit in it."""

    node: str
    position: int
    weight: str
    in_features: int
    columns: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    #: Module paths of the sites reading the node's output (the layer's output projection), if any.
    readers: tuple[str, ...]


@dataclass(frozen=True)
class FusedDelta:
    """One adapter module folded into a column block of a fused node's packed weight."""

    module_path: str
    attention: FusedAttention
    part: int
    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def columns(self) -> tuple[int, int]:
        return self.attention.columns[self.part]

    def describe(self) -> str:
        start, end = self.columns
        return (
            f"{self.module_path} folded into columns {start}:{end} ({PARTS[self.part]}) of "
            f"{self.attention.weight!r}, the packed weight of fused {FUSED_DOMAIN}.{FUSED_OP} node "
            f"{self.attention.node!r}"
        )


def find_fused_attention(model: LoadedModel, scan: SiteScan) -> tuple[FusedAttention, ...]:
    """Every fused Attention node with a constant packed 2-D weight, in graph order."""
    found: list[FusedAttention] = []
    for node in model.ir_model.graph:
        if node.op_type != FUSED_OP or node.domain != FUSED_DOMAIN or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.name is None:
            continue
        shape = constant_shape(weight)
        if len(shape) != 2:
            continue
        attrs = attribute_values(node)
        sizes = [int(s) for s in attrs.get("qkv_hidden_sizes", [])] or [shape[1] // 3] * 3  # type: ignore[attr-defined]
        if len(sizes) != 3 or sum(sizes) != shape[1]:
            continue
        columns = ((0, sizes[0]), (sizes[0], sizes[0] + sizes[1]), (sizes[0] + sizes[1], shape[1]))
        outputs = {value.name for value in node.outputs}
        readers = tuple(site.module_path for site in scan.sites if site.data_input in outputs)
        found.append(FusedAttention(str(node.name), len(found), weight.name, shape[0], columns, readers))
    return tuple(found)


def _projection(path: str) -> tuple[str, int, int] | None:
    """(stack, layer, part) of a module path naming a numbered layer's q/k/v projection."""
    parts = path.split(".")
    if len(parts) < 2 or parts[-1] not in PROJECTIONS:
        return None
    for at in range(len(parts) - 2, -1, -1):
        if parts[at].isdigit():
            return ".".join(parts[:at]), int(parts[at]), PROJECTIONS[parts[-1]]
    return None


def _layer_in(stack: str, path: str) -> int | None:
    """The layer index ``path`` carries after ``stack`` (``encoder.layer`` in ``m.encoder.layer.3.x``)."""
    found = re.search(rf"(?:^|\.){re.escape(stack)}\.(\d+)(?:\.|$)", path) if stack else None
    return int(found.group(1)) if found else None


def _layer_of(attention: FusedAttention, stack: str) -> int | None:
    layers = {layer for path in attention.readers if (layer := _layer_in(stack, path)) is not None}
    return layers.pop() if len(layers) == 1 else None


def split_fused(
    model: LoadedModel,
    scan: SiteScan,
    modules: Sequence[AdapterModule],
    config: PeftAdapterConfig,
    weights: SafetensorsFile,
    *,
    merge: bool,
    source: str,
) -> tuple[list[AdapterModule], tuple[FusedDelta, ...]]:
    """``modules`` without those folded into fused Attention nodes, and their deltas (see
    :func:`claim_fused`); modules a site takes, or that name no fused projection, are all kept."""
    # Imported here: lora_onnx.adapters.peft's planning imports this module.
    from lora_onnx.adapters.peft.mapping import graph_path_of

    paths = list(
        dict.fromkeys(site.module_path for site in scan.sites if kind_of(site.op).peft_role == "lora")
    )
    unmatched = [m for m in modules if m.kind == "lora" and graph_path_of(m, paths, source) is None]
    if not unmatched:
        return list(modules), ()
    _, deltas = claim_fused(model, scan, unmatched, config, weights, merge=merge, source=source)
    claimed = {delta.module_path for delta in deltas}
    return [m for m in modules if m.path not in claimed], deltas


def claim_fused(
    model: LoadedModel,
    scan: SiteScan,
    unmatched: Sequence[AdapterModule],
    config: PeftAdapterConfig,
    weights: SafetensorsFile,
    *,
    merge: bool,
    source: str,
) -> tuple[list[AdapterModule], tuple[FusedDelta, ...]]:
    """Split the adapter modules that match no site into those that name a fused q/k/v projection (their
    deltas) and the rest (left to the usual "matches no module" error).

    Without ``merge`` a claimed module is refused: a fused op takes no branch (see the module doc).
    """
    fused = find_fused_attention(model, scan) if unmatched else ()
    if not fused:
        return list(unmatched), ()
    rest: list[AdapterModule] = []
    deltas: list[FusedDelta] = []
    for module in unmatched:
        projection = _projection(module.path) if module.kind == "lora" else None
        if projection is None:
            rest.append(module)
            continue
        stack, layer, part = projection
        attention = _attention_for(fused, scan, stack, layer, module, source)
        key = module.key("lora_A")
        if not merge:
            raise AdapterError(
                f"{source}: key {key!r} adapts {module.path}, which onnxruntime's transformer optimizer "
                f"fused into {FUSED_DOMAIN}.{FUSED_OP} node {attention.node!r} (q/k/v packed in one weight "
                f"{attention.weight!r}); a fused op has no place for an unmerged LoRA branch: {FIX}"
            )
        unsupported = sorted(set(module.keys) - {"lora_A", "lora_B"})
        if unsupported:
            raise AdapterError(
                f"{source}: module {module.path!r} ({FUSED_DOMAIN}.{FUSED_OP} node {attention.node!r}) has "
                f"{unsupported[0]} tensors, which a fold into the packed weight does not take; apply the "
                "adapter before optimizing"
            )
        deltas.append(_delta(module, attention, part, config, weights, source))
    owners: dict[tuple[str, int], str] = {}
    for delta in deltas:
        spot = (delta.attention.node, delta.part)
        if spot in owners:
            raise AdapterError(
                f"{source}: adapter modules {owners[spot]!r} and {delta.module_path!r} both fold into the "
                f"{PARTS[delta.part]} columns of fused node {delta.attention.node!r}"
            )
        owners[spot] = delta.module_path
    return rest, tuple(deltas)


def _attention_for(
    fused: Sequence[FusedAttention],
    scan: SiteScan,
    stack: str,
    layer: int,
    module: AdapterModule,
    source: str,
) -> FusedAttention:
    by_scope = [attention for attention in fused if _layer_of(attention, stack) == layer]
    if len(by_scope) == 1:
        return by_scope[0]
    if any(_layer_of(attention, stack) is not None for attention in fused):
        raise AdapterError(
            f"{source}: module {module.path!r} names layer {layer}, but no fused {FUSED_OP} node of the "
            "graph belongs to that layer (by the modules around them)"
        )
    # No module paths around the fused nodes: the n-th Attention node is layer n, which holds only if
    # every layer's attention was fused (an unfused projection of the stack would shift the count).
    unfused = [
        site.module_path
        for site in scan.sites
        if kind_of(site.op).peft_role == "lora"
        and (p := _projection(site.module_path)) is not None
        and _layer_in(stack, site.module_path) is not None
        and p[0].endswith(stack)
    ]
    if unfused:
        raise AdapterError(
            f"{source}: module {module.path!r} is fused into an {FUSED_OP} node, but the graph also has "
            f"unfused projections of its stack ({unfused[0]}), so layer order does not say which node; "
            "apply the adapter before optimizing"
        )
    if layer >= len(fused):
        raise AdapterError(
            f"{source}: module {module.path!r} names layer {layer}, but the graph has {len(fused)} fused "
            f"{FUSED_OP} node(s)"
        )
    return fused[layer]


def _delta(
    module: AdapterModule,
    attention: FusedAttention,
    part: int,
    config: PeftAdapterConfig,
    weights: SafetensorsFile,
    source: str,
) -> FusedDelta:
    rank, alpha = config.rank_for(module.path), config.alpha_for(module.path)
    start, end = attention.columns[part]
    expected = {"lora_A": (rank, attention.in_features), "lora_B": (end - start, rank)}
    arrays = {}
    for role, shape in expected.items():
        key = module.key(role)
        actual = tuple(int(d) for d in weights.tensors[key].shape)
        if actual != shape:
            raise AdapterError(
                f"{source}: key {key!r} has shape {actual}, but the {PARTS[part]} block of fused "
                f"{FUSED_OP} node {attention.node!r} (weight {attention.weight!r}) needs {shape} "
                f"(rank {rank})"
            )
        arrays[role] = np.asarray(weights.read(key))
    return FusedDelta(
        module.path, attention, part, arrays["lora_A"], arrays["lora_B"], config.scale(rank, alpha)
    )


def fold_fused(model: LoadedModel, deltas: Sequence[FusedDelta]) -> LoadedModel:
    """A copy of ``model`` whose packed weights carry ``deltas`` (computed in float64, stored in the
    weight's type when the model is saved)."""
    if not deltas:
        return model
    rewritten = model.to_ir()
    graph = rewritten.graph
    by_weight: dict[str, list[FusedDelta]] = {}
    for delta in deltas:
        by_weight.setdefault(delta.attention.weight, []).append(delta)
    producers: dict[str, TensorProducer] = {}
    for name, group in by_weight.items():
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        shape = tuple(int(dim) for dim in value.const_value.shape)
        data_type = int(value.const_value.dtype)
        value.const_value = ir.TensorProtoTensor(make_deferred(name, shape, data_type))  # valued when saved
        producers[name] = _producer(model, name, data_type, group)
    return model.with_ir(rewritten, producers)


def _producer(model: LoadedModel, weight: str, data_type: int, group: list[FusedDelta]) -> TensorProducer:
    def produce() -> np.ndarray:
        packed = np.asarray(model.array(weight), np.float64).copy()
        for delta in group:
            start, end = delta.columns
            # PEFT: W_q += s * B @ A in (out, in); the packed weight is (in, out): its transpose.
            packed[:, start:end] += delta.scale * (delta.b.astype(np.float64) @ delta.a.astype(np.float64)).T
        return packed.astype(np_dtype(data_type))

    return produce


def fused_note(deltas: Sequence[FusedDelta]) -> str:
    """The report's note on modules folded into fused nodes."""
    more = f" (and {len(deltas) - 1} more)" if len(deltas) > 1 else ""
    return f"{len(deltas)} module(s) merged into fused {FUSED_OP} weights: {deltas[0].describe()}{more}"


def fused_reference(model: LoadedModel, deltas: Sequence[FusedDelta]) -> LoadedModel:
    """A copy of ``model`` computing each adapted packed weight in the graph, ``W + Concat(blocks)`` with
    the adapted blocks ``Mul(MatMul(A^T, B^T), s)`` and zeros elsewhere: the proof's reference for
    :func:`fold_fused` (onnxruntime does the arithmetic and the placement of the blocks)."""
    if not deltas:
        return model
    rewritten = model.to_ir()
    graph = rewritten.graph
    names = FreshNames(graph)
    graph_nodes = nodes_by_name(graph)
    values = values_by_name(graph)
    by_node: dict[str, dict[int, FusedDelta]] = {}
    for delta in deltas:
        by_node.setdefault(delta.attention.node, {})[delta.part] = delta
    for name, parts in by_node.items():
        node = graph_nodes[name]
        attention = next(iter(parts.values())).attention
        weight_tensor = graph.initializers[attention.weight].const_value
        assert weight_tensor is not None
        numpy_type = np_dtype(int(weight_tensor.dtype))
        stem = f"{name}.lora_reference"
        make = NodeMaker(names, values)
        blocks = []
        for part, (start, end) in enumerate(attention.columns):
            block = names(f"{stem}.{PARTS[part]}")
            delta = parts.get(part)
            if delta is None:
                zeros = np.zeros((attention.in_features, end - start), numpy_type)
                values[block] = add_initializer(graph, make_tensor(block, zeros))
            else:
                a, b, s = (names(f"{block}.{role}") for role in ("A_t", "B_t", "scale"))
                product = names(f"{block}.product")
                for tensor_name, tensor in (
                    (a, delta.a.T.astype(numpy_type)),
                    (b, delta.b.T.astype(numpy_type)),
                    (s, np.array(delta.scale, numpy_type)),
                ):
                    values[tensor_name] = add_initializer(graph, make_tensor(tensor_name, tensor))
                make.node("MatMul", [a, b], [product], names(product))
                make.node("Mul", [product, s], [block], names(block))
            blocks.append(block)
        packed_delta, weight = names(f"{stem}.delta"), names(f"{stem}.weight")
        make.node("Concat", blocks, [packed_delta], names(packed_delta), axis=1)
        packed = node.inputs[1]
        assert packed is not None and packed.name is not None
        add = make.node("Add", [packed.name, packed_delta], [weight], names(weight))
        node.replace_input_with(1, add.outputs[0])
        graph.insert_before(node, make.nodes)
    return model.with_ir(rewritten)
