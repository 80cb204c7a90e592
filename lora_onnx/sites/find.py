"""Find the nodes that can take a LoRA branch, from graph structure and tensor metadata alone.

A *site* is a node of one of the op kinds (:mod:`lora_onnx.kinds`: Gemm, MatMul, Conv, ConvTranspose
with a constant initializer weight, directly or through Identity / Transpose / Cast / DequantizeLinear;
onnxruntime's ``MatMulNBits``, see :mod:`lora_onnx.sites.quantized`). Every other node of those op types
is *skipped* with the reason, so nothing is dropped silently. Each site records what the later stages
need: the data input, the value the branch joins, the weight's source and layout, in/out features, op
attributes and the module path.

Embedding lookups (``Gather`` on a constant 2-D table, op key ``gather``) are sites too, but only when
asked for: PEFT adapters can carry ``lora_embedding_A/B`` for them; fresh recipes (``--ops``) cannot.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence

import onnx
import onnx_ir as ir
from onnx_ir import serde

from lora_onnx.common.constants import OP_KEYS
from lora_onnx.errors import LoraOnnxError
from lora_onnx.kinds import all_kinds, kind_for_node, kind_of
from lora_onnx.kinds.matmul import INFERRED_RANK, data_rank
from lora_onnx.kinds.site import ConvAttrs, GemmAttrs, Site, SiteScan, Skipped  # noqa: F401  (re-exported)
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord, adapter_names, read_branches
from lora_onnx.model.module_paths import module_path

DEFAULT_OPS = frozenset(OP_KEYS)
#: Every op key :func:`find_sites` understands: --ops plus embedding lookups, which only PEFT import uses.
SITE_OPS = {**OP_KEYS, "gather": "Gather"}


def find_sites(
    model: ModelLike,
    ops: Collection[str] = DEFAULT_OPS,
    *,
    ignore_nodes: Collection[str] = (),
) -> SiteScan:
    """Every eligible node of the op kinds in ``ops`` (keys of :data:`SITE_OPS`), and every skipped one.

    ``ignore_nodes`` are left out entirely (the nodes of existing LoRA branches).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    kinds = [kind for kind in all_kinds() if kind.key in ops]
    rank_ops = {k.op_type for k in kinds if k.wants_data_rank}
    graph = loaded.ir_model.graph
    _infer_missing_ranks(graph, loaded.proto, rank_ops)
    op_types = {kind.op_type for kind in kinds}
    twins = {twin: kind for kind in kinds for twin in kind.integer_twins}
    sites: list[Site] = []
    skipped: list[Skipped] = []
    ignored = set(ignore_nodes)
    for node in graph:
        if node.name in ignored:
            continue
        if node.op_type in twins and node.domain in ("", "ai.onnx"):
            path = module_path(node, _weight_input(node))
            skipped.append(Skipped(node.name, node.op_type, path, _integer_op_reason(node.op_type)))
            continue
        kind = kind_for_node(node)
        if kind is None or kind.op_type not in op_types:
            continue
        found = kind.site(node)
        if isinstance(found, Site):
            sites.append(found)
        else:
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            skipped.append(Skipped(node.name, node.op_type, module_path(node, weight), found))
    # Nodes the rewrite cannot reach (subgraph bodies, model-local functions) are listed, never dropped.
    for node, where in _unreachable_nodes(loaded.ir_model):
        if node.op_type in op_types or node.op_type in twins:
            path = module_path(node, _weight_input(node))
            reason = f"{where}: subgraphs and function bodies are not rewritten, only the main graph"
            if where.startswith("inside model-local function"):
                reason += " (inline the functions first: onnx.inliner.inline_local_functions)"
            skipped.append(Skipped(node.name or "", node.op_type, path, reason))
    return SiteScan(tuple(sites), tuple(skipped))


def _weight_input(node: ir.Node) -> ir.Value | None:
    """The weight input of a MatMul-like node (QLinear ops carry scales and zero points between)."""
    position = 3 if node.op_type.startswith("QLinear") else 1
    return node.inputs[position] if len(node.inputs) > position else None


def _integer_op_reason(op: str) -> str:
    return (
        f"{op} computes in integers (a quantized model's integer kernel), not a float op a LoRA branch can "
        "join; add the adapter before quantizing, or quantize to QDQ (DequantizeLinear weights), which "
        "lora-onnx supports"
    )


def _unreachable_nodes(model: ir.Model) -> Iterator[tuple[ir.Node, str]]:
    """Nodes inside subgraph bodies (If / Loop / Scan) and model-local functions, with where they are."""
    yield from _subgraph_nodes(model.graph, "")
    callers: dict[tuple[str, str], list[str]] = {}
    for node in model.graph:
        callers.setdefault((node.domain, node.op_type), []).append(node.name or "")
    for function in model.functions.values():
        called = callers.get((function.domain, function.name), [])
        by = f", called by node {called[0]!r}" + (f" and {len(called) - 1} more" if len(called) > 1 else "")
        where = f"inside model-local function {function.domain}.{function.name}{by if called else ''}"
        for node in function:
            yield node, where
        yield from _subgraph_nodes(function, f" (in {where})")


def _subgraph_nodes(nodes: Iterable[ir.Node], outer: str) -> Iterator[tuple[ir.Node, str]]:
    for parent in nodes:
        for attr in parent.attributes.values():
            where = f"inside the {attr.name} subgraph of {parent.op_type} {parent.name!r}{outer}"
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                subgraphs = list(attr.value)
            else:
                continue
            for sub in subgraphs:
                yield from ((node, where) for node in sub)
                yield from _subgraph_nodes(sub, f" ({where})")


def _missing_ranks(graph: ir.Graph, op_types: Collection[str]) -> dict[str, ir.Value]:
    """The data inputs of ``op_types`` nodes whose rank the graph does not annotate, by name."""
    return {
        value.name: value
        for node in graph
        if node.op_type in op_types and node.inputs
        for value in node.inputs[:1]
        if value is not None and value.name is not None and data_rank(value) is None
    }


def _infer_missing_ranks(graph: ir.Graph, proto: onnx.ModelProto, op_types: Collection[str]) -> None:
    """Ranks of MatMul data inputs the graph does not annotate (TorchScript exports), from onnx shape
    inference on the graph-only model (metadata only), kept in their values' meta (:data:`INFERRED_RANK`:
    the graph itself is not changed, and a later scan of the same model finds them there)."""
    wanted = _missing_ranks(graph, op_types)
    if not wanted:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is a hint here; a model it cannot handle keeps the default join
        return
    for info in inferred.graph.value_info:
        if info.name in wanted:
            shape = serde.deserialize_type_proto_for_shape(info.type)
            if shape is not None:
                wanted[info.name].meta[INFERRED_RANK] = len(shape)


def source_layout(site: Site) -> str:
    """The source initializer's layout relative to its kind's delta (see :meth:`OpKind.source_layout`)."""
    return kind_of(site.op).source_layout(site)


def existing_branches(model: LoadedModel) -> tuple[BranchRecord, ...]:
    return read_branches(model.ir_model)


def refuse_existing_adapter(model: LoadedModel, adapter: str) -> None:
    if adapter in adapter_names(existing_branches(model)):
        raise LoraOnnxError(
            f"{model.name} already carries an adapter named {adapter!r}; choose another name (--name) "
            "or merge / remove it first"
        )


def scan_sites(model: LoadedModel, ops: Sequence[str] | frozenset[str]) -> SiteScan:
    """Sites of the base graph, leaving out the nodes of branches the model already carries."""
    ignore = {name for branch in existing_branches(model) for name in branch.nodes}
    return find_sites(model, ops, ignore_nodes=ignore)
