"""Synthetic decoder-only transformers of any size, written straight to external data.

The benchmark and the large-model tests need models of hundreds of MB to several GB whose structure is
what exporters produce for a Llama-style decoder: token embedding (Gather), per layer an RMSNorm written
out in primitive ops (onnxruntime fuses it), q/k/v/o projections with multi-head attention, a SiLU-gated
MLP, residual Adds, a final norm and an ``lm_head``. Linear weights are 2-D ``(in, out)`` initializers
named like PyTorch parameters (``model.layers.0.self_attn.q_proj.weight``) on ``MatMul`` nodes named
TorchScript-style (``/model/layers.0/self_attn/q_proj/MatMul``), so module paths resolve as usual.

The graph is built with onnx-ir (an :class:`onnx_ir.tape.Tape` records the nodes; weights are
:class:`onnx_ir.ExternalTensor` references) and serialised with :func:`lora_onnx.model.graph.to_proto`.
The data file is written one tensor at a time in chunks, page-aligned like :mod:`lora_onnx.model.save`
writes it, so building a 3 GB model needs a few MB of memory. ``fill="sparse"`` writes no bytes at all
(the file is sized with ``truncate``, every weight reads as zero): a multi-GB model that costs no disk
space, for tests that must prove a code path never reads weights. Attention has no causal mask (the
cost is the same); the model is for measuring, not for generating text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lora_onnx.model.graph import to_proto

FILLS = ("random", "zeros", "sparse")
_ALIGN = 4096
_CHUNK = 1 << 22  # elements generated per step: 16 MB of float32


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of a synthetic decoder. ``dtype`` is ``float32`` or ``float16``."""

    layers: int = 10
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 16
    vocab: int = 32000
    dtype: str = "float32"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def linears(self) -> list[tuple[str, int, int]]:
        """Every projection as (module path, in, out), in graph order."""
        h, i = self.hidden, self.intermediate
        found = []
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}"
            found += [(f"{prefix}.self_attn.{p}", h, h) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            found += [(f"{prefix}.mlp.gate_proj", h, i), (f"{prefix}.mlp.up_proj", h, i)]
            found.append((f"{prefix}.mlp.down_proj", i, h))
        found.append(("lm_head", h, self.vocab))
        return found

    @property
    def params(self) -> int:
        linear = sum(n_in * n_out + (n_out if self.bias else 0) for _, n_in, n_out in self.linears())
        norms = (2 * self.layers + 1) * self.hidden
        return linear + self.vocab * self.hidden + norms

    @property
    def data_bytes(self) -> int:
        """Approximate size of the data file (alignment padding aside)."""
        return self.params * self.itemsize

    @property
    def largest_tensor_bytes(self) -> int:
        sizes = [n_in * n_out for _, n_in, n_out in self.linears()] + [self.vocab * self.hidden]
        return max(sizes) * self.itemsize

    def linear_flops_per_token(self) -> int:
        """Multiply-add FLOPs of the projections for one token (2 * in * out each)."""
        return sum(2 * n_in * n_out for _, n_in, n_out in self.linears())

    def lora_flops_per_token(self, rank: int) -> int:
        """FLOPs a rank-``rank`` branch on every projection adds per token: 2 * r * (in + out) each."""
        return sum(2 * rank * (n_in + n_out) for _, n_in, n_out in self.linears())


def spec_for_size(
    size_gb: float,
    *,
    hidden: int = 2048,
    intermediate: int | None = None,
    heads: int = 16,
    vocab: int = 32000,
    dtype: str = "float32",
    layers: int | None = None,
) -> DecoderSpec:
    """A spec of about ``size_gb`` GB (10^9 bytes): the number of layers is chosen unless given."""
    intermediate = intermediate or _round_to(int(hidden * 8 / 3 * 1.03), 256)
    probe = DecoderSpec(1, hidden, intermediate, heads, vocab, dtype)
    if layers is None:
        per_layer = DecoderSpec(2, hidden, intermediate, heads, vocab, dtype).data_bytes - probe.data_bytes
        fixed = probe.data_bytes - per_layer
        layers = max(1, math.ceil((size_gb * 1e9 - fixed) / per_layer))
    return DecoderSpec(layers, hidden, intermediate, heads, vocab, dtype)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


class _Writer:
    """Lays tensors out in one data file (page-aligned) and records them on ``tape`` as initializers
    referring to their bytes there."""

    def __init__(self, data_path: Path, fill: str, seed: int, tape: ir.tape.Tape) -> None:
        self.data_path = data_path
        self.fill = fill
        self.rng = np.random.default_rng(seed)
        self.offset = 0
        self.file = open(data_path, "wb")  # noqa: SIM115 - closed by finish()
        self.tape = tape

    def add(self, name: str, shape: tuple[int, ...], dtype: str, init: str = "weight") -> ir.Value:
        """Append a tensor: ``init`` is ``weight`` (uniform, +-1/sqrt(fan_in)), ``ones`` or ``zeros``."""
        np_type = np.dtype(dtype)
        count = math.prod(shape)
        size = count * np_type.itemsize
        self.offset += -self.offset % (_ALIGN if size >= _ALIGN else 16)
        tensor = ir.ExternalTensor(
            self.data_path.name, self.offset, size, ir.DataType.from_numpy(np_type), shape=ir.Shape(shape),
            name=name, base_dir=self.data_path.parent,
        )  # fmt: skip
        value = self.tape.initializer(tensor)
        if self.fill != "sparse":
            self.file.seek(self.offset)
            for chunk in self._chunks(count, shape, np_type, init):
                self.file.write(chunk.tobytes())
        self.offset += size
        return value

    def _chunks(
        self, count: int, shape: tuple[int, ...], np_type: np.dtype, init: str
    ) -> Iterator[np.ndarray]:
        bound = 1.0 / math.sqrt(shape[0]) if len(shape) > 1 else 0.02
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            if init == "ones":
                yield np.ones(n, np_type)
            elif init == "zeros" or self.fill == "zeros":
                yield np.zeros(n, np_type)
            else:
                values = self.rng.random(n, dtype=np.float32)
                values -= 0.5
                values *= 2 * bound
                yield values.astype(np_type, copy=False)

    def finish(self) -> None:
        self.file.truncate(self.offset)
        self.file.close()


def build_decoder(
    path: str | os.PathLike, spec: DecoderSpec, *, fill: str = "random", seed: int = 0, opset: int = 17
) -> Path:
    """Write ``spec`` as ``path`` plus ``<path>.data``; returns ``path``. See the module doc for ``fill``."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    tape = ir.tape.Tape()
    writer = _Writer(output.with_name(output.name + ".data"), fill, seed, tape)
    constants = _constants(spec)
    input_ids = ir.val("input_ids", ir.DataType.INT64, ["batch", "sequence"])
    try:
        logits = _decoder_nodes(spec, writer, input_ids, {value.name: value for value in constants})
    finally:
        writer.finish()
    logits.name = "logits"
    logits.dtype = ir.DataType.from_numpy(np.dtype(spec.dtype))
    logits.shape = ir.Shape(["batch", "sequence", spec.vocab])
    graph = ir.Graph(
        [input_ids], [logits], nodes=tape.nodes, initializers=[*tape.initializers, *constants],
        opset_imports={"": opset}, name="synthetic_decoder",
    )  # fmt: skip
    model = ir.Model(graph, ir_version=8, producer_name="lora-onnx")
    output.write_bytes(to_proto(model).SerializeToString())
    return output


def _constants(spec: DecoderSpec) -> list[ir.Value]:
    dtype = np.dtype(spec.dtype)
    head_dim = spec.hidden // spec.heads
    arrays = {
        "const.two": np.array(2.0, dtype),
        "const.eps": np.array(1e-6, dtype),
        "const.attn_scale": np.array(1 / math.sqrt(head_dim), dtype),
        "const.split_heads": np.array([0, 0, spec.heads, head_dim], np.int64),
        "const.merge_heads": np.array([0, 0, spec.hidden], np.int64),
    }
    values = []
    for name, array in arrays.items():
        tensor = ir.tensor(array, name=name)
        values.append(
            ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        )
    return values


def _decoder_nodes(
    spec: DecoderSpec, writer: _Writer, input_ids: ir.Value, const: dict[str, ir.Value]
) -> ir.Value:
    """Record the decoder's nodes on the writer's tape; returns the lm_head's output (the logits)."""
    dtype = spec.dtype

    def node(op: str, inputs: list[ir.Value], scope: str, suffix: str = "", **attrs: object) -> ir.Value:
        name = f"/{scope.replace('.', '/')}/{op}{suffix}"
        return writer.tape.op(op, inputs, attrs or None, name=name, output=ir.Value(name=f"{name}_output_0"))

    def linear(x: ir.Value, module: str, n_in: int, n_out: int) -> ir.Value:
        weight = writer.add(f"{module}.weight", (n_in, n_out), dtype)
        y = node("MatMul", [x, weight], module)
        if spec.bias:
            bias = writer.add(f"{module}.bias", (n_out,), dtype, "zeros")
            y = node("Add", [y, bias], module)
        return y

    def rms_norm(x: ir.Value, module: str) -> ir.Value:
        gamma = writer.add(f"{module}.weight", (spec.hidden,), dtype, "ones")
        square = node("Pow", [x, const["const.two"]], module)
        mean = node("ReduceMean", [square], module, axes=[-1], keepdims=1)
        std = node("Sqrt", [node("Add", [mean, const["const.eps"]], module)], module)
        normed = node("Div", [x, std], module)
        return node("Mul", [normed, gamma], module)

    embed = writer.add("model.embed_tokens.weight", (spec.vocab, spec.hidden), dtype)
    h = node("Gather", [embed, input_ids], "model.embed_tokens")
    for layer in range(spec.layers):
        prefix = f"model.layers.{layer}"
        attn = f"{prefix}.self_attn"
        x = rms_norm(h, f"{prefix}.input_layernorm")
        q = linear(x, f"{attn}.q_proj", spec.hidden, spec.hidden)
        k = linear(x, f"{attn}.k_proj", spec.hidden, spec.hidden)
        v = linear(x, f"{attn}.v_proj", spec.hidden, spec.hidden)
        q = node(
            "Transpose",
            [node("Reshape", [q, const["const.split_heads"]], attn, "_q")],
            attn,
            "_q",
            perm=[0, 2, 1, 3],
        )
        k = node(
            "Transpose",
            [node("Reshape", [k, const["const.split_heads"]], attn, "_k")],
            attn,
            "_k",
            perm=[0, 2, 3, 1],
        )
        v = node(
            "Transpose",
            [node("Reshape", [v, const["const.split_heads"]], attn, "_v")],
            attn,
            "_v",
            perm=[0, 2, 1, 3],
        )
        scores = node("Mul", [node("MatMul", [q, k], attn, "_qk"), const["const.attn_scale"]], attn, "_scale")
        probs = node("Softmax", [scores], attn, axis=-1)
        context = node("MatMul", [probs, v], attn, "_pv")
        context = node("Transpose", [context], attn, "_ctx", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, const["const.merge_heads"]], attn, "_ctx")
        h = node(
            "Add", [h, linear(context, f"{attn}.o_proj", spec.hidden, spec.hidden)], prefix, "_attn_residual"
        )
        x = rms_norm(h, f"{prefix}.post_attention_layernorm")
        mlp = f"{prefix}.mlp"
        gate = linear(x, f"{mlp}.gate_proj", spec.hidden, spec.intermediate)
        up = linear(x, f"{mlp}.up_proj", spec.hidden, spec.intermediate)
        silu = node("Mul", [gate, node("Sigmoid", [gate], mlp)], mlp, "_silu")
        down = linear(
            node("Mul", [silu, up], mlp, "_gated"), f"{mlp}.down_proj", spec.intermediate, spec.hidden
        )
        h = node("Add", [h, down], prefix, "_mlp_residual")
    x = rms_norm(h, "model.norm")
    return linear(x, "lm_head", spec.hidden, spec.vocab)
