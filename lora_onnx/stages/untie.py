"""Untie shared weights when folding: the adapted nodes get their own folded copy, the others keep the base.

Exporters store a tensor once when several nodes use it: GPT-2's tied ``wte`` feeds the embedding Gather
and, through a Transpose, the ``lm_head`` MatMul (Optimum's post-processing, dynamo with
``optimize=False``); deduplication merges identical initializers. Folding a branch into such a tensor in
place would change the nodes without the branch too. Instead the fold *unties* it: each group of nodes
that carry the same set of branches gets a new initializer, ``W + sum(s * delta)`` in the source's layout
and type (streamed like any folded weight), reached through its own copy of the node's Identity /
Transpose / Cast chain; nodes without a branch keep reading the base tensor unchanged, which is what the
unmerged model computes. A base tensor (and chain) no node reads any more is dropped.

PEFT's own ``merge_and_unload`` on a tied ``lm_head`` writes the delta into the shared parameter, so its
merged model changes the embedding as well and no longer equals its unmerged model (PEFT warns about
it); the untied fold equals the unmerged model.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir import serde

from lora_onnx.kinds import kind_for_node
from lora_onnx.model.graph import GraphIndex, retain, splice_nodes, values_by_name
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.tensors import make_deferred, shape_of
from lora_onnx.model.weights import PASS_THROUGH_OPS, WeightRef, resolve_weight


@dataclass(frozen=True)
class Untied:
    """A shared ``weight`` given to ``nodes`` as their own folded copy ``name``; ``kept`` read the base."""

    weight: str
    name: str
    nodes: tuple[str, ...]
    kept: tuple[str, ...]

    @property
    def note(self) -> str:
        nodes = ", ".join(repr(node) for node in self.nodes)
        kept = ", ".join(repr(node) for node in self.kept)
        rest = f"; {kept} keep{'s' if len(self.kept) == 1 else ''} the base" if self.kept else ""
        return (
            f"untied shared weight {self.weight!r}: {nodes} get{'s' if len(self.nodes) == 1 else ''} its own "
            f"folded copy {self.name!r}{rest} (as the unmerged model computes)"
        )


def untie_refusal(index: GraphIndex, weight: str, users: Iterable[str]) -> str | None:
    """Why ``weight`` cannot be untied among ``users`` (None: it can): a node must reach it through plain
    pass-through chains (a quantized weight's DequantizeLinear is refused by the quantized fold)."""
    for user in users:
        node = index.nodes[user]
        kind = kind_for_node(node)
        if kind is not None and kind.packed_weight:
            return f"node {user!r} reads {weight!r} as packed quantized blocks, which cannot be untied"
        if _weight_position(index, node, weight) is None:
            return f"node {user!r} reads weight {weight!r} in a way lora-onnx cannot copy"
    return None


_IR_VALUES: weakref.WeakKeyDictionary[GraphIndex, dict[str, ir.Value]] = weakref.WeakKeyDictionary()


def _ir_values(index: GraphIndex) -> dict[str, ir.Value]:
    """The indexed graph's values in onnx-ir, for resolve_weight (built once per index)."""
    values = _IR_VALUES.get(index)
    if values is None:
        values = _IR_VALUES[index] = values_by_name(serde.deserialize_graph(index.graph))
    return values


def _weight_position(index: GraphIndex, node: onnx.NodeProto, weight: str) -> tuple[int, WeightRef] | None:
    for position, value in enumerate(node.input):
        if not value:
            continue
        ref = resolve_weight(_ir_values(index).get(value))
        if isinstance(ref, WeightRef) and ref.initializer == weight and ref.dequantize is None:
            return position, ref
    return None


def untie(
    proto: onnx.ModelProto,
    index: GraphIndex,
    groups: Mapping[str, Sequence[tuple[frozenset[str], tuple[str, ...]]]],
    adapter: str,
) -> list[Untied]:
    """Give each group of nodes its own copy of its weight in ``proto`` (in place; ``index`` is the graph
    before the fold). ``groups`` maps a weight to (nodes, kept nodes) pairs; each new initializer is
    metadata only, its folded value comes from the fold's producer under the returned name."""
    graph = proto.graph
    fresh = GraphIndex(graph)
    nodes = {node.name: node for node in graph.node}
    tensors = {tensor.name: tensor for tensor in graph.initializer}
    before: dict[str, list[onnx.NodeProto]] = {}
    released: set[str] = set()
    done: list[Untied] = []
    for weight, pairs in groups.items():
        base = tensors[weight]
        for group, kept in pairs:
            name = fresh.unique_name(f"{weight}.{adapter}.folded")
            graph.initializer.append(make_deferred(name, shape_of(base), base.data_type))
            for node_name in sorted(group, key=lambda n: index.position[n]):
                node = nodes[node_name]
                found = _weight_position(index, index.nodes[node_name], weight)
                assert found is not None  # untie_refusal checked every user
                position, ref = found
                value = name
                for chain_name in ref.chain:  # initializer side first: copy each step for the new tensor
                    step = onnx.NodeProto()
                    step.CopyFrom(index.nodes[chain_name])
                    step.name = fresh.unique_name(f"{chain_name}.{name}")
                    step.input[0] = value
                    del step.output[:]
                    step.output.append(fresh.unique_name(f"{index.nodes[chain_name].output[0]}.{name}"))
                    before.setdefault(node_name, []).append(step)
                    value = step.output[0]
                released.add(node.input[position])
                node.input[position] = value
            done.append(Untied(weight, name, tuple(sorted(group)), kept))
    splice_nodes(graph, before=before)
    drop_released(graph, released)
    return done


def drop_released(graph: onnx.GraphProto, released: Iterable[str]) -> None:
    """Remove what reading ``released`` values kept alive and nothing reads any more: initializers and
    their Identity / Transpose / Cast chains (a tensor another node still reads stays)."""
    outputs = {value.name for value in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {tensor.name for tensor in graph.initializer}
    drop_nodes: set[str] = set()
    drop_values: set[str] = set()
    pending = list(released)
    while pending:
        value = pending.pop()
        if value in outputs or value in drop_values:
            continue
        if any(node.name not in drop_nodes and value in node.input for node in graph.node):
            continue
        producer = producers.get(value)
        if producer is not None and producer.op_type in PASS_THROUGH_OPS:
            drop_nodes.add(producer.name)
            drop_values.add(value)
            pending.extend(producer.input)
        elif producer is None and value in initializers:
            drop_values.add(value)
    retain(graph.node, lambda node: node.name not in drop_nodes)
    retain(graph.initializer, lambda tensor: tensor.name not in drop_values)
    retain(graph.input, lambda value: value.name not in drop_values)
    retain(graph.value_info, lambda value: value.name not in drop_values)


def retarget(records: Sequence[BranchRecord], untied: Sequence[Untied]) -> tuple[BranchRecord, ...]:
    """``records`` (branches left in place) with the weight their node now reads after untying."""
    moved = {(u.weight, node): u.name for u in untied for node in u.nodes}
    return tuple(
        dataclasses.replace(r, weight=moved[(r.weight, r.site)]) if (r.weight, r.site) in moved else r
        for r in records
    )
