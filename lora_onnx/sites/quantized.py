"""Quantized bases: float LoRA branches beside QDQ and MatMulNBits nodes, and folding them.

A quantized base keeps its quantized weight and its fast integer kernel; the branch beside it is float,
in the node's activation type (QLoRA's arrangement). Sites:

- QDQ: a MatMul / Gemm / Conv whose weight comes through ``DequantizeLinear`` (per tensor, per channel
  or blocked; possibly with a Transpose after it) is an ordinary site, found by
  :func:`lora_onnx.model.weights.resolve_weight`: shapes are the quantized tensor's, the type the
  dequantized one's.
- ``com.microsoft.MatMulNBits`` (op key ``matmulnbits``): in = K, out = N from the node's attributes,
  the type from its scales; the branch is the dense MatMul branch, joined after the node (its bias is
  inside it) or after a following bias Add.

Folding into a quantized weight would mean re-quantizing ``W + delta``, which changes the base's own
numerics, so it is refused with that reason unless the user asks for a dequantized float result
(``merge --dequantize``): the weight is then written in float (the dequantized value plus the delta,
streamed block by block), the DequantizeLinear is removed, and a MatMulNBits becomes a MatMul (plus an
Add for its bias). The float weight keeps the quantized initializer's name, so branch records stay valid.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from lora_onnx.kinds import kind_for_node
from lora_onnx.model.dequantize import (
    PACKED_TYPES,
    DequantizeStep,
    NBitsNode,
    NBitsRows,
    QdqRows,
    dequantize_step,
    nbits_node,
)
from lora_onnx.model.graph import FreshNames, nodes_by_name, take_over, values_by_name
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import BranchRecord, read_branches
from lora_onnx.model.streaming import FloatSource
from lora_onnx.model.tensors import np_dtype, shape_of, type_name
from lora_onnx.model.values import constant_dtype
from lora_onnx.model.weights import resolve_weight

_T = onnx.TensorProto
#: Types DequantizeLinear inputs may have that a dequantized fold can read.
_READABLE = {_T.INT8, _T.UINT8, _T.INT16, _T.UINT16, _T.INT32, *PACKED_TYPES} | {
    getattr(_T, name)
    for name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
    if hasattr(_T, name)
}


# ---- folding -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """How a branch's weight is quantized: a DequantizeLinear step, or its MatMulNBits node."""

    weight: str
    step: DequantizeStep | None = None
    nbits: NBitsNode | None = None

    @property
    def node(self) -> str:
        return self.step.node if self.step else self.nbits.node  # type: ignore[union-attr]

    def describe(self, values: Mapping[str, ir.Value]) -> str:
        if self.nbits is not None:
            return f"{self.nbits.bits}-bit, MatMulNBits {self.nbits.node!r}"
        return f"{type_name(constant_dtype(values[self.weight]))}, DequantizeLinear {self.node!r}"


def quantized_weight(nodes: Mapping[str, ir.Node], branch: BranchRecord) -> QuantizedWeight | None:
    """The quantization of ``branch``'s weight as the graph has it now (``nodes``: its nodes by name);
    None for a float weight."""
    node = nodes.get(branch.site)
    if node is None:
        return None
    kind = kind_for_node(node)
    if kind is not None and kind.packed_weight:  # the node reads its packed blocks itself, no chain
        info = nbits_node(node)
        return QuantizedWeight(branch.weight, nbits=info) if not isinstance(info, str) else None
    if len(node.inputs) < 2:
        return None
    ref = resolve_weight(node.inputs[1])
    if isinstance(ref, str) or ref.dequantize is None:
        return None
    step = dequantize_step(nodes[ref.dequantize])
    return QuantizedWeight(ref.initializer, step=step) if not isinstance(step, str) else None


def _dequantize_blocker(
    nodes: Mapping[str, ir.Node], values: Mapping[str, ir.Value], quantized: QuantizedWeight
) -> str | None:
    """Why a dequantized fold of this weight is impossible, or None."""
    weight = values[quantized.weight]
    users = [use.node for use in weight.uses()]
    if len(users) != 1:
        names = ", ".join(repr(user.name) for user in users)
        return f"its quantized weight {quantized.weight!r} feeds several nodes ({names})"
    if quantized.nbits is not None:
        if quantized.nbits.g_idx:
            return (
                f"MatMulNBits {quantized.node!r} has a g_idx (act-order) input, which cannot be dequantized"
            )
        return None
    step = quantized.step
    assert step is not None
    if users[0].name != step.node:
        return (
            f"{users[0].op_type} {users[0].name!r} sits between the quantized weight and its DequantizeLinear"
        )
    dtype = constant_dtype(weight)
    if dtype not in _READABLE:
        return f"its quantized weight has type {type_name(dtype)}, which cannot be dequantized here"
    if nodes[step.node].outputs[0].is_graph_output():
        return f"the output of DequantizeLinear {step.node!r} is also a graph output"
    return None


def fold_refusals(
    graph: ir.Graph, chosen: Sequence[BranchRecord], dequantize: bool
) -> dict[BranchRecord, str]:
    """Branches on quantized weights that cannot be folded (all of them unless ``dequantize``), and why
    (``graph``: the model's graph, read only, e.g. ``LoadedModel.ir_model``)."""
    nodes, values = nodes_by_name(graph), values_by_name(graph)
    reasons: dict[BranchRecord, str] = {}
    for branch in chosen:
        quantized = quantized_weight(nodes, branch)
        if quantized is None:
            continue
        if not dequantize:
            reasons[branch] = (
                f"its weight {quantized.weight!r} is quantized ({quantized.describe(values)}); folding into "
                "it would mean re-quantizing and changing the base, so merge with --dequantize for a float "
                "weight, or keep the branch"
            )
            continue
        blocker = _dequantize_blocker(nodes, values, quantized)
        if blocker:
            reasons[branch] = f"cannot write a dequantized weight: {blocker}"
    return reasons


def dequantize_folded(
    graph: ir.Graph, source: ir.Graph, model: LoadedModel, folding: Sequence[BranchRecord]
) -> dict[str, FloatSource]:
    """Make every quantized weight among ``folding`` a float weight in ``graph`` (edited in place).

    ``source`` is the graph of ``model`` as loaded, read only (``LoadedModel.ir_model``): the weights'
    quantization is traced there. Removes each DequantizeLinear (its readers read the weight directly)
    and replaces each MatMulNBits by a MatMul (+ Add for a bias); gives the weight initializer its float
    type (and, for MatMulNBits, the shape (K, N)); drops scales and zero points no node uses any more.
    Returns, per weight, the float source the fold adds its deltas to.
    """
    nodes, edited = nodes_by_name(source), nodes_by_name(graph)
    sources: dict[str, FloatSource] = {}
    done: set[str] = set()
    names: FreshNames | None = None
    for branch in folding:
        quantized = quantized_weight(nodes, branch)
        if quantized is None or quantized.weight in done:
            continue
        done.add(quantized.weight)
        if quantized.step is not None:
            sources[quantized.weight] = _remove_dequantize(graph, edited, quantized, model)
        else:
            assert quantized.nbits is not None
            if names is None and quantized.nbits.bias:
                names = _taken_names(source, graph)
            sources[quantized.weight] = _replace_nbits(graph, edited, quantized, names, model)
    if done:
        _drop_unused_initializers(graph, source)
    return sources


def _taken_names(source: ir.Graph, graph: ir.Graph) -> FreshNames:
    """Fresh names that avoid the source graph's names and those of the graph as edited so far."""
    names = FreshNames(source)
    for value in (*graph.inputs, *graph.initializers.values()):
        names.reserve(value.name or "")
    for node in graph:
        names.reserve(node.name or "")
        for value in node.outputs:
            names.reserve(value.name or "")
    return names


def _remove_dequantize(
    graph: ir.Graph, nodes: Mapping[str, ir.Node], quantized: QuantizedWeight, model: LoadedModel
) -> FloatSource:
    step = quantized.step
    assert step is not None
    node = nodes[step.node]
    weight = graph.initializers[quantized.weight]
    node.outputs[0].replace_all_uses_with(weight)
    graph.remove(node, safe=True)
    shape = _retype(weight, model, step.dtype, None)
    return FloatSource(shape, np_dtype(step.dtype), lambda: QdqRows(model, step))


def _replace_nbits(
    graph: ir.Graph, nodes: Mapping[str, ir.Node], quantized: QuantizedWeight, names: FreshNames | None,
    model: LoadedModel,
) -> FloatSource:  # fmt: skip
    info = quantized.nbits
    assert info is not None
    old = nodes[info.node]
    output = old.outputs[0]
    weight = graph.initializers[quantized.weight]
    result = ir.Value(name=output.name)
    if info.bias:
        assert names is not None
        product = ir.Value(name=names(f"{info.node}.matmul_output"))
        replacement = [
            ir.node("MatMul", [old.inputs[0], weight], outputs=[product], name=info.node),
            ir.node("Add", [product, old.inputs[5]], outputs=[result], name=f"{info.node}.bias_add"),
        ]
    else:
        replacement = [ir.node("MatMul", [old.inputs[0], weight], outputs=[result], name=info.node)]
    graph.insert_after(old, replacement)
    take_over(output, result)
    graph.remove(old, safe=True)
    dtype = constant_dtype(graph.initializers[info.scales])
    _retype(weight, model, dtype, (info.k, info.n))
    return FloatSource((info.k, info.n), np_dtype(dtype), lambda: NBitsRows(model, info))


def _retype(
    weight: ir.Value, model: LoadedModel, dtype: int, shape: tuple[int, ...] | None
) -> tuple[int, ...]:
    """Give the initializer ``weight`` a new type (and shape); its value comes from the fold's producer at
    save time. The new tensor is a copy of the source's metadata (an external tensor keeps its entries),
    so neither the loaded model nor its view changes."""
    tensor = onnx.TensorProto()
    tensor.CopyFrom(model.initializer(weight.name or ""))
    shape = shape_of(tensor) if shape is None else shape
    tensor.data_type = dtype
    del tensor.dims[:]
    tensor.dims.extend(shape)
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        tensor.ClearField("raw_data")
    wrapped = ir.TensorProtoTensor(tensor)
    weight.const_value = wrapped
    weight.type, weight.shape = ir.TensorType(wrapped.dtype), wrapped.shape
    return shape


def _drop_unused_initializers(graph: ir.Graph, source: ir.Graph) -> None:
    """Remove scales / zero points / g_idx the removed quantized nodes were the last users of."""
    was_used = {value.name for node in source for value in node.inputs if value is not None}
    for name, value in list(graph.initializers.items()):
        unused = not value.uses() and not value.is_graph_output() and not value.is_graph_input()
        if name in was_used and unused:
            graph.initializers.pop(name)


# ---- proofs ------------------------------------------------------------------------------------------


def has_quantized_branches(model: LoadedModel, adapters: Collection[str] | None = None) -> bool:
    """Whether a branch of ``adapters`` (all when None) sits on a quantized weight (its fold then needs
    ``dequantize``)."""
    branches = [b for b in read_branches(model.ir_model) if adapters is None or b.adapter in adapters]
    if not branches:
        return False
    nodes = nodes_by_name(model.ir_model.graph)
    return any(quantized_weight(nodes, branch) is not None for branch in branches)


def without_deltas(model: LoadedModel) -> LoadedModel:
    """``model`` with every constant branch's B set to zero: its outputs are the base's, its fold only
    dequantizes. Comparing the two in onnxruntime measures how far the quantized kernels are from float.
    """
    initializers = {t.name: t for t in model.proto.graph.initializer}
    overrides = {}
    for branch in read_branches(model.ir_model):
        tensor = initializers.get(branch.b)
        if tensor is None:  # not a constant (a graph input): nothing to zero
            continue
        shape, dtype = shape_of(tensor), np_dtype(tensor.data_type)
        overrides[branch.b] = lambda shape=shape, dtype=dtype: np.zeros(shape, dtype)
    return model.with_overrides(overrides)
