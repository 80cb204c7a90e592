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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from lora_onnx.kinds import kind_for_node
from lora_onnx.model.graph import FreshNames, add_initializer, nodes_by_name
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.tensors import make_deferred
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


def untie_refusal(source: ir.Graph, weight: str, users: Iterable[str]) -> str | None:
    """Why ``weight`` cannot be untied among ``users`` (None: it can): a node must reach it through plain
    pass-through chains (a quantized weight's DequantizeLinear is refused by the quantized fold)."""
    nodes = nodes_by_name(source)
    for user in users:
        node = nodes.get(user)
        if node is None:  # the use-def chains also see a control-flow body reading an outer tensor
            return f"node {user!r} reads weight {weight!r} inside a subgraph, which lora-onnx cannot copy"
        kind = kind_for_node(node)
        if kind is not None and kind.packed_weight:
            return f"node {user!r} reads {weight!r} as packed quantized blocks, which cannot be untied"
        if _weight_position(node, weight) is None:
            return f"node {user!r} reads weight {weight!r} in a way lora-onnx cannot copy"
    return None


def _weight_position(node: ir.Node, weight: str) -> tuple[int, WeightRef] | None:
    for position, value in enumerate(node.inputs):
        if value is None:
            continue
        ref = resolve_weight(value)
        if isinstance(ref, WeightRef) and ref.initializer == weight and ref.dequantize is None:
            return position, ref
    return None


def untie(
    graph: ir.Graph,
    source: ir.Graph,
    groups: Mapping[str, Sequence[tuple[frozenset[str], tuple[str, ...]]]],
    adapter: str,
) -> list[Untied]:
    """Give each group of nodes its own copy of its weight in ``graph`` (the fold's onnx-ir copy, edited in
    place; ``source`` is the graph before the fold, where weights are traced). ``groups`` maps a weight to
    (nodes, kept nodes) pairs; each new initializer is metadata only, its folded value comes from the
    fold's producer under the returned name."""
    names = FreshNames(graph)
    nodes = nodes_by_name(graph)
    before = nodes_by_name(source)
    order = {node.name: position for position, node in enumerate(source)}
    released: list[ir.Value] = []
    done: list[Untied] = []
    for weight, pairs in groups.items():
        base = graph.initializers[weight]
        for group, kept in pairs:
            name = names(f"{weight}.{adapter}.folded")
            folded = add_initializer(graph, make_deferred(name, _shape(base), _dtype(base)))
            for node_name in sorted(group, key=lambda n: order[n]):
                node = nodes[node_name]
                found = _weight_position(before[node_name], weight)
                assert found is not None  # untie_refusal checked every user
                position, ref = found
                value, steps = folded, []
                for chain_name in ref.chain:  # initializer side first: copy each step for the new tensor
                    step = nodes[chain_name]
                    step_name = names(f"{chain_name}.{name}")
                    output = ir.Value(name=names(f"{step.outputs[0].name}.{name}"))
                    steps.append(_copy_step(step, value, output, step_name))
                    value = output
                if steps:
                    graph.insert_before(node, steps)
                replaced = node.inputs[position]
                assert replaced is not None
                released.append(replaced)
                node.replace_input_with(position, value)
            done.append(Untied(weight, name, tuple(sorted(group)), kept))
    drop_released(graph, released)
    return done


def _shape(value: ir.Value) -> tuple[int, ...]:
    tensor = value.const_value
    assert tensor is not None
    return tuple(int(dim) for dim in tensor.shape)


def _dtype(value: ir.Value) -> int:
    tensor = value.const_value
    assert tensor is not None
    return int(tensor.dtype)


def _copy_step(step: ir.Node, source: ir.Value, output: ir.Value, name: str) -> ir.Node:
    """A copy of pass-through node ``step`` reading ``source`` and writing ``output`` (its other inputs and
    attributes kept)."""
    attributes = [
        ir.Attr(attr.name, attr.type, attr.value, doc_string=attr.doc_string)
        for attr in step.attributes.values()
    ]
    return ir.Node(
        step.domain,
        step.op_type,
        [source, *step.inputs[1:]],
        attributes,
        overload=step.overload,
        outputs=[output],
        name=name,
        doc_string=step.doc_string,
        metadata_props=dict(step.metadata_props),
    )


def drop_released(graph: ir.Graph, released: Iterable[ir.Value]) -> None:
    """Remove what reading ``released`` values kept alive and nothing reads any more: initializers and
    their Identity / Transpose / Cast chains (a tensor another node still reads stays)."""
    drop_nodes: dict[int, ir.Node] = {}
    drop_values: dict[int, ir.Value] = {}
    pending = list(released)
    while pending:
        value = pending.pop()
        if value.is_graph_output() or id(value) in drop_values:
            continue
        if any(id(use.node) not in drop_nodes for use in value.uses()):
            continue
        producer = value.producer()
        if producer is not None and producer.op_type in PASS_THROUGH_OPS:
            drop_nodes[id(producer)] = producer
            drop_values[id(value)] = value
            pending.extend(item for item in producer.inputs if item is not None)
        elif producer is None and value.is_initializer():
            drop_values[id(value)] = value
    graph.remove(list(drop_nodes.values()), safe=True)
    for value in drop_values.values():
        if value.is_graph_input():
            graph.inputs.remove(value)
        if value.is_initializer() and value.name is not None:
            graph.initializers.pop(value.name)


def retarget(records: Sequence[BranchRecord], untied: Sequence[Untied]) -> tuple[BranchRecord, ...]:
    """``records`` (branches left in place) with the weight their node now reads after untying."""
    moved = {(u.weight, node): u.name for u in untied for node in u.nodes}
    return tuple(
        dataclasses.replace(r, weight=moved[(r.weight, r.site)]) if (r.weight, r.site) in moved else r
        for r in records
    )
