"""Fold (merge) branches into their base weights: ``W' = W + s * delta`` in the weight's own layout.

The graph edit is immediate (branch nodes and tensors removed, the base output renamed back); the new
weight values are *producers* run when the model is saved, one weight at a time, reading the old weight
memory-mapped, computing in float32 and casting back to the weight's type.

A weight can be folded only when every node that uses it (through any Identity / Transpose / Cast chain)
carries the same set of folded branches; otherwise folding would change a node that has no branch, or
give two nodes each other's delta. Such branches, and a dense A on a grouped conv (its delta mixes input
groups), are refused with their reason, or kept in place with a warning when a partial fold is asked for.
So are branches on quantized weights (QDQ, MatMulNBits) unless ``dequantize`` asks for a float result
(see :mod:`lora_onnx.sites.quantized`).

What differs per branch variant (slots and stacks refuse, DoRA scales output channels, a ``lora_B.bias``
folds into the base node's bias) is asked of the variant's plug-in (:mod:`lora_onnx.variants`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from lora_onnx.errors import FoldError

# The delta math lives in lora_onnx.kinds.deltas; re-exported where callers have always found it.
from lora_onnx.kinds.deltas import branch_delta as branch_delta
from lora_onnx.kinds.deltas import conv_delta as conv_delta
from lora_onnx.kinds.deltas import dense_delta as dense_delta
from lora_onnx.kinds.deltas import folded_weight
from lora_onnx.model import streaming
from lora_onnx.model.dequantize import DEQUANTIZE_OPS
from lora_onnx.model.graph import nodes_by_name, take_over, values_by_name
from lora_onnx.model.load import LoadedModel, TensorProducer
from lora_onnx.model.manifest import BranchRecord, read_branches, write_branches
from lora_onnx.model.weights import PASS_THROUGH_OPS
from lora_onnx.sites import quantized
from lora_onnx.stages.branch_checks import check_branch_shapes
from lora_onnx.stages.contract import Stage, StageResult
from lora_onnx.stages.untie import Untied, retarget, untie, untie_refusal
from lora_onnx.variants import by_variant, variant_for


@dataclass(frozen=True)
class Kept:
    """A branch left in place by a partial fold, and why."""

    branch: BranchRecord
    reason: str


@dataclass(frozen=True)
class FoldResult(StageResult):
    """A fold's result: ``records`` are the branches folded (also ``folded``), ``kept`` those a partial
    fold left in place and why, ``untied`` the shared weights the fold untied
    (:mod:`lora_onnx.stages.untie`; :attr:`notes` says which, for the user)."""

    kept: tuple[Kept, ...] = ()
    untied: tuple[Untied, ...] = ()

    @property
    def folded(self) -> tuple[BranchRecord, ...]:
        return self.records

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(untied.note for untied in self.untied)


#: Tolerances for comparing a fold with its unfolded model when folded weights are stored in half precision:
#: rounding W + delta to float16 / bfloat16 moves outputs by ~1e-3, which float32 output defaults would flag.
HALF_PRECISION_TOLERANCE = (1e-2, 1e-3)
_HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def fold_tolerance(result: FoldResult) -> tuple[float | None, float | None]:
    """(rtol, atol) for proving ``result`` against its input: None picks the output type's defaults."""
    present = {tensor.name for tensor in result.model.proto.graph.initializer}
    weights = {branch.weight for branch in result.folded} | {untied.name for untied in result.untied}
    stored = {result.model.initializer(name).data_type for name in weights & present}
    return HALF_PRECISION_TOLERANCE if stored & set(_HALF_TYPES) else (None, None)


#: Readers of a tensor's shape alone: a fold keeps the weight's shape, so they see no change (dynamo's
#: ``optimize=False`` exports feed a conv weight to a Shape node).
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def _terminal_users(weight: ir.Value) -> list[str]:
    """Nodes using ``weight`` directly or through pass-through chains (the chain nodes excluded)."""
    users: list[str] = []
    pending = [weight]
    while pending:
        value = pending.pop()
        for use in value.uses():
            node = use.node
            dequantizes = node.op_type in DEQUANTIZE_OPS and use.idx == 0
            if node.op_type in PASS_THROUGH_OPS or dequantizes:
                pending.extend(node.outputs)
            elif node.op_type not in SHAPE_ONLY_OPS:
                users.append(node.name or "")
    return users


def fold_branches(
    model: LoadedModel,
    *,
    adapters: Collection[str] | None = None,
    partial: bool = False,
    dequantize: bool = False,
    remedy: str = "merge --partial (partial=True) keeps such branches in place",
) -> FoldResult:
    """Fold the branches of ``adapters`` (all when None) into their weights; see the module doc.

    ``dequantize`` folds branches on quantized weights too, writing those weights in float. ``remedy``
    ends the refusal of a branch that cannot be folded: what the caller's user can do about it.
    """
    result = FoldBranches(adapters=adapters, partial=partial, dequantize=dequantize, remedy=remedy)(model)
    assert isinstance(result, FoldResult)
    return result


class FoldBranches(Stage):
    """Fold branches into their weights, ``W' = W + s * delta`` (streamed when saved); a weight shared
    by nodes with different branches (or none) is untied first (:mod:`lora_onnx.stages.untie`)."""

    name = "fold branches"

    def __init__(
        self, *, adapters: Collection[str] | None, partial: bool, dequantize: bool, remedy: str
    ) -> None:
        self.adapters, self.partial, self.dequantize, self.remedy = adapters, partial, dequantize, remedy

    def _chosen(self, model: LoadedModel) -> tuple[tuple[BranchRecord, ...], list[BranchRecord]]:
        branches = read_branches(model.ir_model)
        return branches, [b for b in branches if self.adapters is None or b.adapter in self.adapters]

    def requires(self, model: LoadedModel) -> None:
        branches, chosen = self._chosen(model)
        if not branches:
            raise FoldError(f"{model.name} carries no lora-onnx branches to fold")
        if not chosen:
            names = sorted({b.adapter for b in branches})
            raise FoldError(f"no branch of adapter(s) {sorted(self.adapters or [])}; the model has {names}")
        # Shapes first, from metadata: a misfit tensor would otherwise fail inside numpy at save time.
        check_branch_shapes(model, chosen)

    def call(self, model: LoadedModel) -> FoldResult:
        branches, chosen = self._chosen(model)
        source = model.ir_model.graph  # weights are traced on the input as it is
        rewritten = model.to_ir()  # read as the input is, then rewritten once every refusal is known
        graph = rewritten.graph
        groups: dict[str, list[tuple[frozenset[str], tuple[str, ...]]]] = {}
        reasons = {
            **_refusals(source, graph, chosen, branches, groups),
            **quantized.fold_refusals(source, chosen, self.dequantize),
        }
        if reasons and not self.partial:
            first = next(iter(reasons.items()))
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise FoldError(
                f"cannot fold the branch at node {first[0].site!r} ({first[0].module_path}): {first[1]}"
                f"{more}; {self.remedy}"
            )
        folding = [b for b in chosen if b not in reasons]
        kept = tuple(Kept(branch, reason) for branch, reason in reasons.items())
        remaining = tuple(b for b in branches if b not in folding)

        remove_branches(graph, folding, remaining)
        refused = {branch.weight for branch in reasons}
        adapter = "_".join(sorted({b.adapter for b in folding})) or "lora"
        untied = untie(graph, source, {w: g for w, g in groups.items() if w not in refused}, adapter)
        remaining = retarget(remaining, untied)
        sources: dict[str, streaming.FloatSource] = {}
        source_nodes = nodes_by_name(source)
        if any(quantized.quantized_weight(source_nodes, branch) is not None for branch in folding):
            sources = quantized.dequantize_folded(graph, source, model, folding)
        producers = _weight_producers(model, folding, sources, untied)
        for variant, group in by_variant(folding).items():
            producers.update(variant.fold_beside_weight(model, graph, group))
        write_branches(rewritten, remaining)
        folded = model.with_ir(rewritten, producers)
        return FoldResult(folded, tuple(folding), kept=kept, untied=tuple(untied), modified=bool(folding))


def _refusals(
    source: ir.Graph,
    graph: ir.Graph,
    chosen: Sequence[BranchRecord],
    branches: Sequence[BranchRecord] = (),
    groups: dict[str, list[tuple[frozenset[str], tuple[str, ...]]]] | None = None,
) -> dict[BranchRecord, str]:
    """Why each branch of ``chosen`` cannot be folded. A weight shared by nodes whose branches differ
    (or with nodes that have none) is untied (:mod:`lora_onnx.stages.untie`) when ``groups`` is given: it is
    filled with each such weight's groups of nodes (one new copy each) and the nodes that keep the base.
    ``graph`` is the fold's onnx-ir copy before any edit (its weights' readers are its use-def chains);
    ``source`` is the input graph, where a node's weight is traced."""
    reasons: dict[BranchRecord, str] = {}
    for branch in chosen:
        reason = variant_for(branch).fold_refusal(branch)
        if reason:
            reasons[branch] = reason
        elif branch.weight not in graph.initializers:
            reasons[branch] = f"its weight {branch.weight!r} is no longer an initializer of the graph"
    by_weight: dict[str, list[BranchRecord]] = defaultdict(list)
    for branch in chosen:
        by_weight[branch.weight].append(branch)
    for weight, group in by_weight.items():
        per_node: dict[str, set[tuple[str, str, float]]] = defaultdict(set)
        for branch in group:
            per_node[branch.site].add((branch.a, branch.b, branch.scale))
        initializer = graph.initializers.get(weight)
        users = _terminal_users(initializer) if initializer is not None else []
        bare = [user for user in users if user not in per_node]
        distinct = {frozenset(deltas) for deltas in per_node.values()}
        shared = initializer is not None and (bool(bare) or len(distinct) > 1)
        reason = untie_refusal(source, weight, users) if shared and groups is not None else None
        if shared and (groups is None or reason):
            what = (
                f"shared with node {bare[0]!r}, which has no branch to fold"
                if bare
                else "shared by nodes whose branches differ, so no single fold fits all"
            )
            reason = f"its weight {weight!r} is {what}" + (f" ({reason})" if reason else "")
        elif shared and groups is not None:
            # Untied: one copy per set of branches; each copy's branches answer to their variants alone.
            by_deltas: dict[frozenset[tuple[str, str, float]], set[str]] = defaultdict(set)
            for node, deltas in per_node.items():
                by_deltas[frozenset(deltas)].add(node)
            groups[weight] = [(frozenset(nodes), tuple(bare)) for nodes in by_deltas.values()]
            on_weight = [b for b in (branches or group) if b.weight == weight]
            found = (
                _weight_refusal(weight, [b for b in on_weight if b.site in nodes])
                for nodes in by_deltas.values()
            )
            reason = next((r for r in found if r), None)
        else:
            reason = _weight_refusal(weight, branches or group)
        if reason:
            for branch in group:
                reasons.setdefault(branch, reason)
    # A weight is folded whole or not at all: one refused branch keeps its weight's other branches too.
    refused_weights = {b.weight for b in reasons}
    for branch in chosen:
        if branch.weight in refused_weights and branch not in reasons:
            reasons[branch] = f"another branch on its weight {branch.weight!r} cannot be folded"
    return reasons


def _weight_refusal(weight: str, branches: Sequence[BranchRecord]) -> str | None:
    """What the variants on ``weight`` say against folding its branches together (every branch on it,
    folded or not: a variant such as DoRA minds deltas that stay unfolded too)."""
    on_weight = [b for b in branches if b.weight == weight]
    reasons = (variant.weight_refusal(weight, on_weight) for variant in by_variant(on_weight))
    return next((reason for reason in reasons if reason), None)


def remove_branches(
    graph: ir.Graph, folding: Sequence[BranchRecord], remaining: Sequence[BranchRecord]
) -> None:
    """Take ``folding``'s nodes and tensors out of ``graph`` (in place), reconnecting each base output.

    No weight changes here: folding pairs it with new weight values; :mod:`lora_onnx.stages.slots` uses it
    alone to drop LoRA slots (which add zeros when no adapter is active).
    """
    values = values_by_name(graph)
    nodes = nodes_by_name(graph)
    for branch in folding:
        # The branch's Add may have been renamed by a branch stacked on it later, so the base output takes
        # whatever the Add outputs *now*: the stacked branch then reads the base directly.
        add, base = nodes.get(branch.nodes[-1]), values.get(branch.base_join)
        if add is None or base is None or base.producer() is None:
            raise FoldError(
                f"the branch at node {branch.site!r} is not in the graph as recorded; was the model edited "
                "after lora-onnx rewrote it?"
            )
        joined = add.outputs[0]
        name = joined.name
        take_over(joined, base)
        joined.name = None
        base.name = name
        values[name] = base  # a branch stacked on this one now finds the base under the Add's name
    dropping = [nodes[name] for branch in folding for name in branch.nodes if name in nodes]
    try:
        graph.remove(list({id(node): node for node in dropping}.values()), safe=True)
    except ValueError as exc:
        raise FoldError(
            f"a branch's nodes feed nodes outside it, so it cannot be removed; was the model edited after "
            f"lora-onnx rewrote it? ({exc})"
        ) from exc
    kept = {name for branch in remaining for name in branch.tensors}
    inputs = {value.name: value for value in graph.inputs}
    for name in dict.fromkeys(name for branch in folding for name in branch.tensors):
        value = graph.initializers.get(name)
        value = inputs.get(name) if value is None else value
        if name in kept or value is None or value.uses() or value.is_graph_output():
            continue
        # Slot branches (lora_onnx.stages.slots) also declare their tensors as graph inputs.
        if value.is_graph_input():
            graph.inputs.remove(value)
        if value.is_initializer():
            graph.initializers.pop(name)


def _weight_producers(
    model: LoadedModel,
    folding: Sequence[BranchRecord],
    sources: Mapping[str, streaming.FloatSource] | None = None,
    untied: Sequence[Untied] = (),
) -> dict[str, TensorProducer]:
    # One delta per distinct (A, B, scale) on a weight: a module run twice shares its branch tensors,
    # and its delta must be added once, not once per node. An untied node's delta goes to its own copy.
    copies = {(u.weight, node): u.name for u in untied for node in u.nodes}
    deltas: dict[tuple[str, str], dict[tuple[str, str, float], BranchRecord]] = defaultdict(dict)
    for branch in folding:
        target = copies.get((branch.weight, branch.site), branch.weight)
        deltas[(target, branch.weight)].setdefault((branch.a, branch.b, branch.scale), branch)
    sources = sources or {}
    return {
        target: _producer(model, weight, list(group.values()), sources.get(weight))
        for (target, weight), group in deltas.items()
    }


def _producer(
    model: LoadedModel, weight: str, branches: list[BranchRecord], source: streaming.FloatSource | None
) -> TensorProducer:
    # Streamed in row blocks (lora_onnx.model.streaming): memory stays a few MB even for a GB-sized lm_head.
    # ``source`` is the dequantized value of a quantized weight (merge --dequantize). A variant that rescales
    # its weight (DoRA; alone on it, see _refusals) scales each output channel of W + s * delta by its factor.
    rescaling = next((branch for branch in branches if variant_for(branch).rescales_weight), None)
    scale = None
    if rescaling is not None:

        def scale(ndim: int) -> np.ndarray:
            factor = variant_for(rescaling).channel_factor(model, rescaling, ndim)
            assert factor is not None  # a variant that rescales its weight gives the factor
            return factor

    return folded_weight(model, weight, branches, source, channel_scale=scale)
