"""Find the nodes that can take a LoRA branch, from graph structure and tensor metadata alone.

A *site* is one Gemm, MatMul or Conv node whose weight is a constant initializer (directly or through
Identity / Transpose / Cast / DequantizeLinear), or one onnxruntime ``MatMulNBits`` node (4-bit and
other block-quantized weights, see :mod:`lora_onnx.sites.quantized`). Every other node of those op types is
*skipped* with the reason, so nothing is dropped silently. Each site records what the later stages
need: the data input, the value the branch joins, the weight's source and layout, in/out features, op
attributes and the module path.

Embedding lookups (``Gather`` on a constant 2-D table, op key ``gather``) are sites too, but only when
asked for: PEFT adapters can carry ``lora_embedding_A/B`` for them; fresh recipes (``--ops``) cannot.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import onnx

from lora_onnx.common.constants import OP_KEYS
from lora_onnx.errors import LoraOnnxError
from lora_onnx.model.graph import GraphIndex
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord, adapter_names, read_branches
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.weights import WeightRef, resolve_weight

DEFAULT_OPS = frozenset(OP_KEYS)
#: Every op key :func:`find_sites` understands: --ops plus embedding lookups, which only PEFT import uses.
SITE_OPS = {**OP_KEYS, "gather": "Gather"}
#: Domains of op types outside the ONNX domain (onnxruntime's contrib ops).
OP_DOMAINS = {"MatMulNBits": ("com.microsoft",)}
_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class GemmAttrs:
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: int = 0
    trans_b: int = 0


@dataclass(frozen=True)
class ConvAttrs:
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    group: int


@dataclass(frozen=True)
class Site:
    """A node that can take a branch ``y += s * B(A(x))``.

    ``output`` is the value the branch is added to: the node's own output, or, for a MatMul on a 2-D input
    followed by its bias Add (``bias_add``), that Add's output, so onnxruntime can still fuse MatMul +
    bias into a Gemm (for N-d inputs the branch joins before the bias Add). ``layout`` describes the
    weight as the node sees it: ``in,out`` (MatMul, Gemm transB=0), ``out,in`` (Gemm transB=1) or
    ``out,in/group,k...`` (Conv) or ``vocab,dim`` (Gather: ``in_features`` is the vocabulary, the data
    input the indices).
    """

    node: str
    op: str
    module_path: str
    data_input: str
    output: str
    weight: WeightRef
    layout: str
    in_features: int
    out_features: int
    gemm: GemmAttrs | None = None
    conv: ConvAttrs | None = None
    bias_add: str | None = None

    @property
    def dtype(self) -> int:
        """The element type the node computes in; LoRA tensors take it."""
        return self.weight.node_dtype

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.conv.kernel_shape if self.conv else ()

    @property
    def group(self) -> int:
        return self.conv.group if self.conv else 1

    @property
    def weight_params(self) -> int:
        count = 1
        for dim in self.weight.source_shape:
            count *= dim
        return count


@dataclass(frozen=True)
class Skipped:
    """A node of a supported op type that cannot take a branch, and why."""

    node: str
    op: str
    module_path: str
    reason: str


@dataclass(frozen=True)
class SiteScan:
    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]


def find_sites(
    model: ModelLike,
    ops: Collection[str] = DEFAULT_OPS,
    *,
    ignore_nodes: Collection[str] = (),
) -> SiteScan:
    """Every eligible node of the op types in ``ops`` (keys of :data:`SITE_OPS`), and every skipped one.

    ``ignore_nodes`` are left out entirely (the nodes of existing LoRA branches).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    graph = loaded.proto.graph
    index = GraphIndex(graph)
    _infer_missing_ranks(index, loaded.proto)
    op_types = {SITE_OPS[key] for key in ops}
    sites: list[Site] = []
    skipped: list[Skipped] = []
    ignored = set(ignore_nodes)
    integer_ops = {op for op, key in INTEGER_OPS.items() if key in ops}
    for node in graph.node:
        if node.name in ignored:
            continue
        if node.op_type in integer_ops and node.domain in _ONNX_DOMAINS:
            path = module_path(index, node, _weight_input(node))
            skipped.append(Skipped(node.name, node.op_type, path, _integer_op_reason(node.op_type)))
            continue
        if node.op_type not in op_types:
            continue
        if node.domain not in OP_DOMAINS.get(node.op_type, _ONNX_DOMAINS):
            continue
        found = _site_or_reason(index, node)
        if isinstance(found, Site):
            sites.append(found)
        else:
            weight = node.input[1] if len(node.input) > 1 else None
            skipped.append(Skipped(node.name, node.op_type, module_path(index, node, weight), found))
    # Nodes the rewrite cannot reach (subgraph bodies, model-local functions) are listed, never dropped.
    for node, where in _unreachable_nodes(loaded.proto):
        if node.op_type in op_types or node.op_type in integer_ops:
            path = module_path(index, node, _weight_input(node))
            reason = f"{where}: subgraphs and function bodies are not rewritten, only the main graph"
            if where.startswith("inside model-local function"):
                reason += " (inline the functions first: onnx.inliner.inline_local_functions)"
            skipped.append(Skipped(node.name, node.op_type, path, reason))
    return SiteScan(tuple(sites), tuple(skipped))


#: Integer-arithmetic ops (dynamically / statically quantized models) -> the op key that asks for them.
INTEGER_OPS = {
    "MatMulInteger": "matmul",
    "QLinearMatMul": "matmul",
    "ConvInteger": "conv",
    "QLinearConv": "conv",
}
#: Element types a LoRA branch can compute in (it adds float products to the node's output).
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


def _weight_input(node: onnx.NodeProto) -> str | None:
    """The weight input of a MatMul-like node (QLinear ops carry scales and zero points between)."""
    position = 3 if node.op_type.startswith("QLinear") else 1
    return node.input[position] if len(node.input) > position and node.input[position] else None


def _integer_op_reason(op: str) -> str:
    return (
        f"{op} computes in integers (a quantized model's integer kernel), not a float op a LoRA branch can "
        "join; add the adapter before quantizing, or quantize to QDQ (DequantizeLinear weights), which "
        "lora-onnx supports"
    )


def _unreachable_nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, str]]:
    """Nodes inside subgraph bodies (If / Loop / Scan) and model-local functions, with where they are."""
    yield from _subgraph_nodes(model.graph.node, "")
    callers: dict[tuple[str, str], list[str]] = {}
    for node in model.graph.node:
        callers.setdefault((node.domain, node.op_type), []).append(node.name)
    for function in model.functions:
        called = callers.get((function.domain, function.name), [])
        by = f", called by node {called[0]!r}" + (f" and {len(called) - 1} more" if len(called) > 1 else "")
        where = f"inside model-local function {function.domain}.{function.name}{by if called else ''}"
        for node in function.node:
            yield node, where
        yield from _subgraph_nodes(function.node, f" (in {where})")


def _subgraph_nodes(nodes: Iterable[onnx.NodeProto], outer: str) -> Iterator[tuple[onnx.NodeProto, str]]:
    for parent in nodes:
        for attr in parent.attribute:
            where = f"inside the {attr.name} subgraph of {parent.op_type} {parent.name!r}{outer}"
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                for node in sub.node:
                    yield node, where
                yield from _subgraph_nodes(sub.node, f" ({where})")


def _site_or_reason(index: GraphIndex, node: onnx.NodeProto) -> Site | str:
    if node.op_type == "MatMulNBits":
        from lora_onnx.sites.quantized import matmulnbits_site  # imports this module: import at call time

        return matmulnbits_site(index, node)
    if len(node.input) < 2 or not node.input[1]:
        return "has no weight input"
    if node.op_type == "Gather":
        return _gather_site(index, node)
    data, weight_value = node.input[0], node.input[1]
    data_is_constant = index.is_constant(data) or _is_traced_constant(index, data)
    if data_is_constant:
        if node.op_type == "Conv":
            return "the data input is a constant"
        return "the weight is the first input (W @ x); a LoRA branch needs x @ W with W as the second input"
    weight = resolve_weight(index, weight_value)
    if isinstance(weight, str):
        return weight
    if weight.node_dtype not in FLOAT_TYPES:
        kind = onnx.helper.tensor_dtype_to_np_dtype(weight.node_dtype)
        return (
            f"weight {weight.initializer!r} is {kind}: an integer {node.op_type} is no float op, and a LoRA "
            "branch computes in float (its values would truncate to integers)"
        )
    path = module_path(index, node, weight.initializer)
    if node.op_type == "Conv":
        return _conv_site(index, node, weight, path)
    return _dense_site(index, node, weight, path)


def _is_traced_constant(index: GraphIndex, value: str) -> bool:
    return not isinstance(resolve_weight(index, value), str)


def _dense_site(index: GraphIndex, node: onnx.NodeProto, weight: WeightRef, path: str) -> Site | str:
    shape = weight.node_shape
    if len(shape) != 2:
        return f"weight {weight.initializer!r} has shape {list(shape)}; only 2-D weights take a dense branch"
    if 0 in shape:
        return f"weight {weight.initializer!r} is empty (shape {list(shape)})"
    if node.op_type == "Gemm":
        attrs = index.attributes(node)
        gemm = GemmAttrs(
            alpha=float(attrs.get("alpha", 1.0)),  # type: ignore[arg-type]
            beta=float(attrs.get("beta", 1.0)),  # type: ignore[arg-type]
            trans_a=int(attrs.get("transA", 0)),  # type: ignore[call-overload]
            trans_b=int(attrs.get("transB", 0)),  # type: ignore[call-overload]
        )
        in_f, out_f = (shape[1], shape[0]) if gemm.trans_b else shape
        layout = "out,in" if gemm.trans_b else "in,out"
        return Site(
            node.name, "Gemm", path, node.input[0], node.output[0], weight, layout, in_f, out_f, gemm=gemm
        )
    output, bias_add = _join_after_bias(index, node, out_features=shape[1])
    return Site(
        node.name,
        "MatMul",
        path,
        node.input[0],
        output,
        weight,
        "in,out",
        shape[0],
        shape[1],
        bias_add=bias_add,
    )


def _join_after_bias(index: GraphIndex, node: onnx.NodeProto, out_features: int) -> tuple[str, str | None]:
    """The join value and the node's bias Add (its lone consumer ``Add(mm, bias)``, constant (out,) bias).

    The branch joins after the bias Add for a 2-D (or unknown-rank) data input, where onnxruntime fuses
    MatMul + bias into a Gemm. For N-d inputs it fuses the bias with what follows instead (BiasGelu,
    SkipLayerNormalization's bias), so the branch joins before the bias Add and leaves that pair
    adjacent; the bias Add is still reported (a PEFT ``lora_B.bias`` folds into it).
    """
    output = node.output[0]
    consumers = index.consumers.get(output, [])
    if output in index.graph_outputs or len(consumers) != 1 or consumers[0].op_type != "Add":
        return output, None
    add = consumers[0]
    other = add.input[1] if add.input[0] == output else add.input[0]
    bias = resolve_weight(index, other)
    if isinstance(bias, str) or bias.node_shape != (out_features,) or other == output:
        return output, None
    if _rank(index, node.input[0]) not in (2, None):
        return output, add.name
    return add.output[0], add.name


def _rank(index: GraphIndex, value: str) -> int | None:
    info = index.value_info.get(value)
    if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    return len(info.type.tensor_type.shape.dim)


def _infer_missing_ranks(index: GraphIndex, proto: onnx.ModelProto) -> None:
    """Ranks of MatMul data inputs the graph does not annotate (TorchScript exports), from onnx shape
    inference on the graph-only model (metadata only), added to ``index.value_info``."""
    wanted = {
        node.input[0]
        for node in index.graph.node
        if node.op_type in ("MatMul", "MatMulNBits") and node.input and _rank(index, node.input[0]) is None
    }
    if not wanted:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is a hint here; a model it cannot handle keeps the default join
        return
    for info in inferred.graph.value_info:
        if info.name in wanted:
            index.value_info[info.name] = info


def _conv_site(index: GraphIndex, node: onnx.NodeProto, weight: WeightRef, path: str) -> Site | str:
    shape = weight.node_shape
    if len(shape) < 3:
        return f"conv weight {weight.initializer!r} has shape {list(shape)}; expected (out, in/group, k...)"
    if 0 in shape:
        return f"weight {weight.initializer!r} is empty (shape {list(shape)})"
    spatial = len(shape) - 2
    attrs = index.attributes(node)
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", shape[2:]))  # type: ignore[union-attr]
    if kernel != tuple(shape[2:]):
        return f"kernel_shape {list(kernel)} disagrees with weight {weight.initializer!r} {list(shape)}"
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    conv = ConvAttrs(
        kernel_shape=kernel,
        strides=tuple(int(v) for v in attrs.get("strides", [1] * spatial)),  # type: ignore[union-attr]
        dilations=tuple(int(v) for v in attrs.get("dilations", [1] * spatial)),  # type: ignore[union-attr]
        pads=tuple(int(v) for v in attrs.get("pads", [0] * 2 * spatial)),  # type: ignore[union-attr]
        auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
        group=int(attrs.get("group", 1)),  # type: ignore[call-overload]
    )
    layout = "out,in/group," + ",".join(f"k{i + 1}" for i in range(spatial))
    return Site(
        node.name,
        "Conv",
        path,
        node.input[0],
        node.output[0],
        weight,
        layout,
        in_features=shape[1] * conv.group,
        out_features=shape[0],
        conv=conv,
    )


def _gather_site(index: GraphIndex, node: onnx.NodeProto) -> Site | str:
    """An embedding lookup: ``Gather(table, ids)`` along axis 0 of a constant 2-D table."""
    weight = resolve_weight(index, node.input[0])
    if isinstance(weight, str):
        return weight
    if weight.node_dtype not in FLOAT_TYPES:
        return f"table {weight.initializer!r} holds integers: an embedding table is float"
    shape = weight.node_shape
    if len(shape) != 2 or 0 in shape:
        return f"table {weight.initializer!r} has shape {list(shape)}; an embedding is a non-empty 2-D table"
    axis = int(index.attributes(node).get("axis", 0))  # type: ignore[call-overload]
    if axis not in (0, -2):
        return f"gathers along axis {axis}; an embedding lookup gathers rows (axis 0)"
    path = module_path(index, node, weight.initializer)
    return Site(
        node.name, "Gather", path, node.input[1], node.output[0], weight, "vocab,dim", shape[0], shape[1]
    )


def source_layout(site: Site) -> str:
    """The source initializer's layout relative to a dense delta in (in, out) orientation."""
    if site.op == "Conv":
        return "conv"
    node_is_out_in = site.layout == "out,in"
    return "out,in" if node_is_out_in != site.weight.transposed else "in,out"


def existing_branches(model: LoadedModel) -> tuple[BranchRecord, ...]:
    return read_branches(model.proto)


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
