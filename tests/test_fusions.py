"""The base path stays fast: onnxruntime fuses the base nodes of an injected model as it fuses the base
model's (checked in its optimized graph), and a merged model is the base graph again."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lora_onnx
from lora_onnx import LoraConfig
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.save import save_model

F = TensorProto.FLOAT


class _Builder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        self.inits[name] = (self.rng.standard_normal(shape) * 0.1).astype(np.float32)
        return name

    def const(self, name: str, value: object, dtype: type = np.float32) -> str:
        self.inits[name] = np.array(value, dtype)
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], f"/{name}/{op}", **attrs))
        return name

    def linear(self, x: str, module: str, n_in: int, n_out: int) -> str:
        mm = self.node("MatMul", [x, self.weight(f"{module}.weight", (n_in, n_out))], f"{module}.mm")
        return self.node("Add", [mm, self.weight(f"{module}.bias", (n_out,))], module)

    def model(self, inputs: dict[str, list[int | str]], output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(name, F, shape) for name, shape in inputs.items()],
            [helper.make_tensor_value_info(output, F, None)],
            [numpy_helper.from_array(value, name) for name, value in self.inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def _transformer_block(hidden: int = 32, inner: int = 64, heads: int = 4) -> onnx.ModelProto:
    """Pre-LN-free BERT-style block: biased q/k/v/o and MLP, erf GELU, residual Adds, LayerNorms."""
    b = _Builder()
    ln = {"axis": -1}
    x = b.node(
        "LayerNormalization", ["x", b.weight("ln1.w", (hidden,)), b.weight("ln1.b", (hidden,))], "ln1", **ln
    )
    split, merge = (
        b.const("split", [0, 0, heads, hidden // heads], np.int64),
        b.const("merge", [0, 0, hidden], np.int64),
    )
    q, k, v = (b.linear(x, f"attn.{p}", hidden, hidden) for p in "qkv")
    q = b.node("Transpose", [b.node("Reshape", [q, split], "q_r")], "q_t", perm=[0, 2, 1, 3])
    k = b.node("Transpose", [b.node("Reshape", [k, split], "k_r")], "k_t", perm=[0, 2, 3, 1])
    v = b.node("Transpose", [b.node("Reshape", [v, split], "v_r")], "v_t", perm=[0, 2, 1, 3])
    scores = b.node("Mul", [b.node("MatMul", [q, k], "qk"), b.const("scale", 0.5)], "qk_scaled")
    context = b.node("MatMul", [b.node("Softmax", [scores], "probs", axis=-1), v], "pv")
    context = b.node("Reshape", [b.node("Transpose", [context], "ctx_t", perm=[0, 2, 1, 3]), merge], "ctx")
    h = b.node("Add", ["x", b.linear(context, "attn.o", hidden, hidden)], "residual1")
    x = b.node(
        "LayerNormalization", [h, b.weight("ln2.w", (hidden,)), b.weight("ln2.b", (hidden,))], "ln2", **ln
    )
    up = b.linear(x, "mlp.up", hidden, inner)
    erf = b.node("Erf", [b.node("Div", [up, b.const("sqrt2", np.sqrt(2))], "gelu_div")], "gelu_erf")
    half_gelu = b.node("Mul", [up, b.node("Add", [erf, b.const("one", 1)], "gelu_add")], "gelu_mul")
    gelu = b.node("Mul", [half_gelu, b.const("half", 0.5)], "gelu")
    h = b.node("Add", [h, b.linear(gelu, "mlp.down", inner, hidden)], "residual2")
    b.node("LayerNormalization", [h, b.weight("ln3.w", (hidden,)), b.weight("ln3.b", (hidden,))], "y", **ln)
    return b.model({"x": ["batch", "sequence", hidden]}, "y")


def _optimized(model: onnx.ModelProto | LoadedModel, folder: Path) -> onnx.GraphProto:
    if isinstance(model, LoadedModel):
        path = save_model(model, folder / f"m{len(list(folder.iterdir()))}.onnx")
    else:
        path = folder / f"m{len(list(folder.iterdir()))}.onnx"
        onnx.save(model, path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(folder / "optimized.onnx", load_external_data=False).graph


def _weight_users(graph: onnx.GraphProto, names: set[str]) -> dict[str, str]:
    """Base initializer -> the op type of the optimized node that consumes it."""
    return {value: node.op_type for node in graph.node for value in node.input if value in names}


def _ops(graph: onnx.GraphProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in graph.node)


def test_2d_matmul_and_bias_still_fuse_into_gemm(tmp_path: Path) -> None:
    b = _Builder()
    b.node("Relu", [b.linear("x", "fc", 16, 12)], "y")
    model = b.model({"x": [4, 16]}, "y")
    base = _optimized(model, tmp_path)
    assert [(n.op_type, list(n.input)) for n in base.node] == [("FusedGemm", ["x", "fc.weight", "fc.bias"])]
    injected = _optimized(lora_onnx.inject(model, LoraConfig(rank=4, init="random")).model, tmp_path)
    # MatMul + bias is still one Gemm; the branch's B MatMul absorbs the join Add and the Relu
    # (FusedGemm(x A, B, C = base output)), so no separate elementwise pass is left
    gemm = next(n for n in injected.node if "fc.weight" in n.input)
    assert gemm.op_type == "Gemm" and list(gemm.input)[1:] == ["fc.weight", "fc.bias"]
    assert sorted(n.op_type for n in injected.node if n is not gemm) == ["FusedGemm", "MatMul"]


def test_transformer_block_keeps_every_base_fusion(tmp_path: Path) -> None:
    model = _transformer_block()
    base = _optimized(model, tmp_path)
    fused = {"BiasGelu", "SkipLayerNormalization", "FusedMatMul", "LayerNormalization"}
    assert fused <= set(_ops(base))  # what onnxruntime makes of the base
    result = lora_onnx.inject(model, LoraConfig(rank=4, init="random"))
    assert len(result.branches) == 6
    injected = _optimized(result.model, tmp_path)
    names = {t.name for t in model.graph.initializer}
    # every base weight and bias ends up in the same kind of fused node as in the base
    assert _weight_users(injected, names) == _weight_users(base, names)
    assert {op: _ops(injected)[op] for op in fused} == {op: _ops(base)[op] for op in fused}


def test_full_qdq_matmul_keeps_an_integer_kernel(tmp_path: Path) -> None:
    """DQ -> MatMul -> Q: the float branch must be added before the output's QuantizeLinear (so the
    unmerged and merged models agree), which turns QLinearMatMul into MatMulIntegerToFloat: the base
    node still runs on an integer kernel."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], "q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], "dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], "dq_w", axis=1),
        helper.make_node("MatMul", ["xd", "w"], ["mm"], "/fc/MatMul"),
        helper.make_node("QuantizeLinear", ["mm", "s", "z"], ["yq"], "q_y"),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], "dq_y"),
    ]
    inits = {
        "s": np.float32(0.05),
        "z": np.uint8(128),
        "w_q": rng.integers(-63, 64, size=(16, 8)).astype(np.int8),
        "w_s": rng.uniform(0.01, 0.02, size=(8,)).astype(np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", F, [4, 16])],
        [helper.make_tensor_value_info("y", F, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert _ops(_optimized(model, tmp_path))["QLinearMatMul"] == 1
    result = lora_onnx.inject(model, LoraConfig(rank=2, init="random"), validate=True)
    assert result.validation is not None and result.validation.ok
    ops = _ops(_optimized(result.model, tmp_path))
    assert ops["MatMulIntegerToFloat"] == 1 and ops["QuantizeLinear"] >= 1


def test_merged_model_is_the_base_graph_with_the_base_fusions(tmp_path: Path) -> None:
    model = _transformer_block()
    lora = save_model(
        lora_onnx.inject(model, LoraConfig(rank=4, init="random")).model, tmp_path / "lora.onnx"
    )
    merged = lora_onnx.merge(lora).model
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in merged.proto.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node
    ]
    assert _ops(_optimized(merged, tmp_path)) == _ops(_optimized(model, tmp_path))


def test_join_point_follows_the_input_rank() -> None:
    """2-D: after the bias Add (MatMul + bias -> Gemm); N-d: before it (bias -> BiasGelu / SkipLayerNorm).
    Either way the bias Add is reported, for folding a PEFT ``lora_B.bias`` into it."""
    for shape, join in (([4, 16], "fc"), (["batch", "sequence", 16], "fc.mm"), ([2, 3, 5, 16], "fc.mm")):
        b = _Builder()
        b.node("Relu", [b.linear("x", "fc", 16, 12)], "y")
        (site,) = lora_onnx.find_sites(b.model({"x": shape}, "y")).sites
        assert (site.output, site.bias_add) == (join, "/fc/Add")
    # a graph that records no rank for the input: the rank is inferred from the graph-only model
    b = _Builder()
    b.node("Relu", [b.linear(b.node("Relu", ["x"], "pre"), "fc", 16, 12)], "y")
    model = b.model({"x": ["batch", "sequence", 16]}, "y")
    assert not model.graph.value_info
    (site,) = lora_onnx.find_sites(model).sites
    assert site.output == "fc.mm"
