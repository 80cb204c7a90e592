"""Generated inputs for decoders with a KV cache (Optimum's and onnxruntime-genai's exports).

A decoder's inputs are tied together by three lengths: the cache's past length P (axis -2 of every
``past_key_values.N.key`` / ``.value``), the new tokens' length S (axis 1 of ``input_ids``) and the total
T = P + S (``attention_mask``'s last axis: Optimum names it ``past_sequence_length + sequence_length``,
genai ``total_sequence_length``). Independent defaults would give inputs no model accepts, so the dims
get consistent values: S and P from ``--dim`` or :data:`DEFAULT_SEQ` / :data:`DEFAULT_PAST`, T = P + S
(a ``--dim`` for T alone sets P = T - S). Values follow: ``position_ids`` and ``cache_position`` are
``P .. T-1``, GroupQueryAttention's ``seqlens_k`` is T - 1 per row and ``total_sequence_length`` is T,
``logits_to_keep`` / ``num_logits_to_keep`` is 1 (the last token's logits, valid in every convention).
genai's symbolic head size (``kv_cache_dim``) is read from its GroupQueryAttention node, and there S
defaults to 1 (a decode step): onnxruntime's GroupQueryAttention takes several new tokens with a past
only on a batch of one.

Independently of a cache, an integer input that indexes an embedding table (a Gather or
GatherBlockQuantized on an initializer, through casts and reshapes) takes ids below the table's row
count, so token ids never index out of range (position and token-type ids keep their own rules).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lora_onnx.errors import LoraOnnxError
from lora_onnx.kinds import kind_for_node

if TYPE_CHECKING:  # annotations only: inputs.py imports this module, and onnx loads on first use
    import onnx
    import onnx_ir as ir

    from lora_onnx.proofs.inputs import InputSpec

#: Default new-token and past lengths of a decoder with a cache (distinct, so a mix-up fails to run).
DEFAULT_SEQ, DEFAULT_PAST = 8, 4
_PAST = re.compile(r"past", re.IGNORECASE)
_IDS = re.compile(r"input_ids$|^ids$|token", re.IGNORECASE)
_KEEP = re.compile(r"^(num_)?logits_to_keep$", re.IGNORECASE)
_CACHE_POSITION = re.compile(r"^cache_position$", re.IGNORECASE)
_SEQLENS = re.compile(r"^seqlens_k$", re.IGNORECASE)
_TOTAL_INPUT = re.compile(r"^total_seq(uence)?_len(gth)?$", re.IGNORECASE)
#: Ops an index input may pass through on its way to the table's Gather.
_PASS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
_GATHERS = {"Gather": (0, 1), "GatherBlockQuantized": (0, 1)}  # op -> (data input, indices input)


@dataclass(frozen=True)
class DecoderLayout:
    """The roles of a model's symbolic dims and inputs (see the module doc).

    ``past`` / ``seq``: the dim names of P and S (None when the model has no cache / no token input);
    ``totals``: dim names meaning P + S; ``fixed``: symbolic dims whose value the model itself fixes
    (genai's head size); ``vocab``: integer inputs that index a table -> its row count;
    ``default_seq``: S unless ``--dim`` sets it (1 with GroupQueryAttention, see the module doc).
    """

    past: str | None = None
    seq: str | None = None
    totals: tuple[str, ...] = ()
    fixed: Mapping[str, int] = field(default_factory=dict)
    vocab: Mapping[str, int] = field(default_factory=dict)
    default_seq: int = DEFAULT_SEQ

    @property
    def has_cache(self) -> bool:
        return self.past is not None


def _float(spec_type: str) -> bool:
    return spec_type in ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


def _is_past(spec: InputSpec) -> bool:
    return bool(_PAST.search(spec.name)) and _float(spec.type) and len(spec.dims) >= 3


def vocab_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    """Graph inputs that index an initializer table (through casts / reshapes) -> the fewest rows."""
    tables = {t.name: (int(t.dims[0]) if t.dims else 0) for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, int] = {}
    for value in graph.input:
        if value.name in tables:
            continue
        frontier, seen = [value.name], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in consumers.get(name, ()):
                if node.op_type in _PASS and node.input and node.input[0] == name:
                    frontier.extend(node.output)
                elif node.op_type in _GATHERS:
                    data, indices = _GATHERS[node.op_type]
                    axis = next((a.i for a in node.attribute if a.name in ("axis", "gather_axis")), 0)
                    if (
                        len(node.input) > indices
                        and node.input[indices] == name
                        and node.input[data] in tables
                        and axis == 0
                        and tables[node.input[data]] > 0
                    ):
                        rows = tables[node.input[data]]
                        found[value.name] = min(rows, found.get(value.name, rows))
    return found


def _attribute(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


@dataclass(frozen=True)
class _Graph:
    """Look-ups over a graph, made once."""

    producers: Mapping[str, onnx.NodeProto]
    tables: Mapping[str, list[int]]
    infos: Mapping[str, onnx.ValueInfoProto]
    #: The onnx-ir node writing each value (the kinds read nodes in onnx-ir).
    ir_producers: Mapping[str, ir.Node] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _Graph:
        from onnx_ir import serde

        return cls(
            {out: node for node in graph.node for out in node.output},
            {t.name: list(t.dims) for t in graph.initializer},
            {v.name: v for v in (*graph.value_info, *graph.output)},
            {out.name: node for node in serde.deserialize_graph(graph) for out in node.outputs if out.name},
        )

    def width(self, value: str) -> int | None:
        """The last dim of ``value``: declared, or from the MatMul (on an initializer; MatMulNBits) that
        makes it, through a bias Add or a Cast."""
        info = self.infos.get(value)
        if info is not None and info.type.tensor_type.shape.dim:
            last = info.type.tensor_type.shape.dim[-1]
            if last.HasField("dim_value"):
                return int(last.dim_value)
        node = self.producers.get(value)
        for _ in range(4):
            if node is None:
                return None
            kind = kind_for_node(node)  # a MatMul on an initializer, a MatMulNBits (its N)
            ir_node = self.ir_producers.get(node.output[0]) if node.output else None
            width = kind.output_width(ir_node) if kind is not None and ir_node is not None else None
            if width is not None:
                return width
            if node.op_type not in ("Add", "Cast"):
                return None
            node = next(
                (self.producers[i] for i in node.input if i in self.producers and i not in self.tables), None
            )
        return None


def _head_sizes(graph: onnx.GraphProto, specs: Sequence[InputSpec]) -> dict[str, int]:
    """genai's symbolic head size (the past inputs' last dim), from its GroupQueryAttention nodes."""
    fixed: dict[str, int] = {}
    past_dims = {
        spec.name: spec.dims[-1] for spec in specs if _is_past(spec) and isinstance(spec.dims[-1], str)
    }
    if not past_dims:
        return fixed
    looks = _Graph.of(graph)
    for node in graph.node:  # GroupQueryAttention(query, key, value, past_key, past_value, ...)
        if node.op_type != "GroupQueryAttention" or len(node.input) < 5:
            continue
        heads, kv_heads = _attribute(node, "num_heads"), _attribute(node, "kv_num_heads")
        packed = len(node.input) < 2 or not node.input[1]
        width = looks.width(node.input[0])
        if not heads or width is None:
            continue
        parts = heads + 2 * (kv_heads or heads) if packed else heads
        if width % parts:
            continue
        for name in node.input[3:5]:
            if name in past_dims:
                fixed[past_dims[name]] = width // parts
    return fixed


def decoder_layout(specs: Sequence[InputSpec], graph: onnx.GraphProto | None) -> DecoderLayout:
    """The dim and input roles of a model whose inputs are ``specs`` (``graph`` for tables and heads)."""
    past = next(
        (s.dims[-2] for s in specs if _is_past(s) and isinstance(s.dims[-2], str)),
        None,
    )
    seq = None
    for spec in specs:
        dims = spec.dims
        if _IDS.search(spec.name) and len(dims) >= 2 and isinstance(dims[1], str):
            seq = dims[1]
            break
    totals: list[str] = []
    if past is not None:
        for spec in specs:
            for dim in spec.dims:
                if not isinstance(dim, str) or dim in (past, seq) or dim in totals:
                    continue
                parts = {p.strip() for p in dim.split("+")}
                if "total" in dim.lower() or (len(parts) == 2 and past in parts):
                    totals.append(dim)
    vocab = vocab_sizes(graph) if graph is not None else {}
    fixed = _head_sizes(graph, specs) if graph is not None else {}
    gqa = graph is not None and any(n.op_type == "GroupQueryAttention" for n in graph.node)
    return DecoderLayout(past, seq, tuple(totals), fixed, vocab, 1 if gqa else DEFAULT_SEQ)


def decoder_sizes(layout: DecoderLayout, dims: Mapping[str, int]) -> dict[str, int]:
    """Values for the layout's dims, consistent with each other and with the user's ``dims``."""
    sizes = {name: value for name, value in layout.fixed.items() if name not in dims}
    if not layout.has_cache:
        return {**sizes, **dims}
    past, seq = layout.past, layout.seq
    given_total = next((dims[t] for t in layout.totals if t in dims), None)
    s = dims.get(seq, layout.default_seq) if seq is not None else layout.default_seq
    if past in dims:
        p = dims[past]
    elif given_total is not None:
        p = given_total - s
        if p < 1:
            raise LoraOnnxError(
                f"--dim {layout.totals[0]}={given_total} leaves no past length for {past!r} with "
                f"{seq or 'the sequence length'}={s} (the total is past + sequence)"
            )
    else:
        p = DEFAULT_PAST
    total = p + s
    for name in layout.totals:
        if name in dims and dims[name] != total:
            raise LoraOnnxError(
                f"--dim {name}={dims[name]} disagrees with {past}={p} + {seq or 'sequence'}={s}; "
                f"the total is past + sequence ({total})"
            )
        sizes[name] = total
    sizes[past] = p
    if seq is not None:
        sizes[seq] = s
    return {**sizes, **dims}


def decoder_value(
    spec: InputSpec,
    shape: tuple[int, ...],
    dtype: np.dtype,
    layout: DecoderLayout,
    sizes: Mapping[str, int],
    rng: np.random.Generator,
    max_token: int,
) -> np.ndarray | None:
    """The value of one decoder input, or None when the ordinary rule applies (see the module doc)."""
    name = spec.name
    if not np.issubdtype(dtype, np.integer):
        return None
    if name in layout.vocab and not any(word in name.lower() for word in ("position", "type")):
        return rng.integers(0, min(layout.vocab[name], max_token), size=shape).astype(dtype)
    if _KEEP.search(name):
        return np.ones(shape, dtype)
    if not layout.has_cache:
        return None
    past = sizes[layout.past]
    total = past + (
        sizes.get(layout.seq, layout.default_seq) if layout.seq is not None else layout.default_seq
    )
    lowered = name.lower()
    if _SEQLENS.search(name):
        return np.full(shape, total - 1, dtype)
    if _TOTAL_INPUT.search(name):
        return np.full(shape, total, dtype)
    if (_CACHE_POSITION.search(name) or "position" in lowered) and shape:
        return np.broadcast_to(np.arange(past, past + shape[-1], dtype=dtype), shape).copy()
    return None
