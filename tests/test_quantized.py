"""Quantized bases: float branches beside QDQ (MatMul / Gemm / Conv) and MatMulNBits nodes, checked in
onnxruntime against numpy; folding refused unless dequantized; dequantized folds against numpy."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lora_onnx
from lora_onnx import LoraConfig
from lora_onnx.cli.main import main
from lora_onnx.errors import FoldError
from lora_onnx.model.load import LoadedModel, load_model
from lora_onnx.model.manifest import read_branches
from lora_onnx.model.save import save_model
from lora_onnx.stages.fold import fold_branches

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, *, opset: int = 17, ms: bool = False) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    tensors = [
        v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(v, k) for k, v in inits.items()
    ]
    graph = helper.make_graph(
        nodes,
        "quantized",
        [helper.make_tensor_value_info(name, F, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, F, None) for name in outputs],
        tensors,
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10 if opset >= 21 else 8
    return model


def _session(
    model: onnx.ModelProto | Path,
    level: ort.GraphOptimizationLevel | None = None,
    opt_path: Path | None = None,
):  # type: ignore[no-untyped-def]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    if opt_path is not None:
        options.optimized_model_filepath = str(opt_path)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


#: Numeric checks run without onnxruntime's quantized-kernel fusions, which approximate: ORT 1.32 turns
#: DequantizeLinear(int8) -> MatMul into MatMulNBits with int8 activations (accuracy_level 4).
EXACT = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
#: Kernels onnxruntime fuses quantized nodes into; a branch must leave their number unchanged.
QUANTIZED_KERNELS = ("MatMulNBits", "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger")


def _run(model: LoadedModel | onnx.ModelProto | Path, feeds: dict[str, np.ndarray], tmp: Path) -> np.ndarray:
    if isinstance(model, LoadedModel):
        model = save_model(model, tmp / f"run{len(list(tmp.iterdir()))}.onnx")
    return _session(model, level=EXACT).run(None, feeds)[0]


def _kernels(model: LoadedModel | onnx.ModelProto | Path, tmp: Path) -> dict[str, int]:
    """Quantized kernels in onnxruntime's optimized graph (all optimizations on)."""
    if isinstance(model, LoadedModel):
        model = save_model(model, tmp / f"opt{len(list(tmp.iterdir()))}.onnx")
    _session(model, opt_path=tmp / "optimized.onnx")
    ops = collections.Counter(
        n.op_type for n in onnx.load(tmp / "optimized.onnx", load_external_data=False).graph.node
    )
    return {op: ops[op] for op in QUANTIZED_KERNELS if ops[op]}


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def _branch_term(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    (branch,) = read_branches(model.proto)
    a, b = model.array(branch.a).astype(np.float64), model.array(branch.b).astype(np.float64)
    return branch.scale * (x @ a) @ b


def _fake_quant(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    """QuantizeLinear + DequantizeLinear to uint8, as onnxruntime rounds (half to even)."""
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


# ---- QDQ ---------------------------------------------------------------------------------------------


def _qdq_matmul(
    per_channel: bool, stored_transposed: bool, activations: bool
) -> tuple[onnx.ModelProto, np.ndarray]:
    k, n = 24, 16
    # 7-bit codes: onnxruntime's u8s8 integer kernels on AVX2 saturate with full-range int8 weights
    codes = RNG.integers(-63, 64, size=(k, n)).astype(np.int8)
    scale = RNG.uniform(0.005, 0.02, size=(n,)).astype(np.float32) if per_channel else np.float32(0.01)
    weight = codes.astype(np.float64) * scale
    nodes, inits = [], {"scale": scale}
    if stored_transposed:  # (out, in) storage, per-channel along axis 0, then Transpose to (in, out)
        inits["w_q"] = np.ascontiguousarray(codes.T)
        nodes += [
            helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w_t"], "/fc/dq", axis=0),
            helper.make_node("Transpose", ["w_t"], ["w"], "/fc/transpose", perm=[1, 0]),
        ]
    else:
        inits["w_q"] = codes
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w"], "/fc/dq", axis=1))
    data = "x"
    if activations:
        inits.update(x_scale=np.float32(0.03), x_zero=np.uint8(128))
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], "/fc/q_x"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], "/fc/dq_x"),
        ]
        data = "x_dq"
    nodes.append(helper.make_node("MatMul", [data, "w"], ["y"], "/fc/MatMul"))
    return _model(nodes, {"x": [2, 3, k]}, ["y"], inits), weight


@pytest.mark.parametrize(
    ("per_channel", "stored_transposed", "activations"),
    [(False, False, False), (True, False, True), (True, True, False), (True, True, True)],
)
def test_qdq_matmul_branch_matches_numpy(
    tmp_path: Path, per_channel: bool, stored_transposed: bool, activations: bool
) -> None:
    model, weight = _qdq_matmul(per_channel, stored_transposed, activations)
    (site,) = lora_onnx.find_sites(model).sites
    assert (site.in_features, site.out_features, site.dtype) == (24, 16, F)
    assert site.weight.initializer == "w_q" and site.weight.dequantize == "/fc/dq"
    assert site.weight.transposed == stored_transposed and site.module_path == "fc"

    result = lora_onnx.inject(model, LoraConfig(rank=4, alpha=8, init="random", seed=1))
    lora = result.model.initializer(read_branches(result.model.proto)[0].a)
    assert lora.data_type == F  # a float branch beside the int8 weight
    x = RNG.standard_normal((2, 3, 24)).astype(np.float32)
    xq = _fake_quant(x.astype(np.float64), 0.03, 128) if activations else x.astype(np.float64)
    expected = xq @ weight + _branch_term(result.model, xq)
    assert _rel(_run(result.model, {"x": x}, tmp_path), expected) <= 1e-5
    base_kernels = _kernels(model, tmp_path)
    assert _kernels(result.model, tmp_path) == base_kernels  # the base is still fused as it was
    assert base_kernels or stored_transposed  # (onnxruntime fuses no Transpose-ed quantized weight)

    # folding into int8 is refused; a dequantized float fold equals the same numpy reference
    with pytest.raises(FoldError, match=r"quantized \(int8, DequantizeLinear '/fc/dq'\).*--dequantize"):
        fold_branches(result.model)
    folded = fold_branches(result.model, dequantize=True).model
    graph = folded.proto.graph
    assert [n.op_type for n in graph.node if n.name != "/fc/dq"] == [n.op_type for n in graph.node]
    assert {t.name: t.data_type for t in graph.initializer}["w_q"] == F
    assert "scale" not in {t.name for t in graph.initializer}
    assert _rel(_run(folded, {"x": x}, tmp_path), expected) <= 1e-5


def _conv_reference(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """2-D conv, stride 1, pads 1, in float64."""
    batch, _, height, width = x.shape
    out, per_group, kh, kw = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((batch, out, height, width))
    out_per_group = out // group
    for o in range(out):
        g = o // out_per_group
        for i in range(per_group):
            for dy in range(kh):
                for dx in range(kw):
                    y[:, o] += (
                        w[o, i, dy, dx] * padded[:, g * per_group + i, dy : dy + height, dx : dx + width]
                    )
    return y


def test_qdq_gemm_and_grouped_conv_branches_match_numpy(tmp_path: Path) -> None:
    codes_g = RNG.integers(-63, 64, size=(10, 12)).astype(np.int8)  # Gemm transB=1: (out, in)
    scale_g = RNG.uniform(0.01, 0.02, size=(10,)).astype(np.float32)
    codes_c = RNG.integers(-63, 64, size=(6, 2, 3, 3)).astype(np.int8)
    scale_c = RNG.uniform(0.01, 0.02, size=(6,)).astype(np.float32)
    bias = RNG.standard_normal(10).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["g_q", "g_scale"], ["g_w"], "/head/dq", axis=0),
        helper.make_node("Gemm", ["x", "g_w", "bias"], ["y"], "/head/Gemm", transB=1, alpha=0.5),
        helper.make_node("DequantizeLinear", ["c_q", "c_scale"], ["c_w"], "/conv/dq", axis=0),
        helper.make_node("Conv", ["img", "c_w"], ["c"], "/conv/Conv", group=2, pads=[1, 1, 1, 1]),
    ]
    inits = {"g_q": codes_g, "g_scale": scale_g, "c_q": codes_c, "c_scale": scale_c, "bias": bias}
    model = _model(nodes, {"x": [3, 12], "img": [1, 4, 5, 5]}, ["y", "c"], inits)
    result = lora_onnx.inject(model, LoraConfig(rank=2, init="random", seed=2))
    branches = {b.op: b for b in read_branches(result.model.proto)}
    assert set(branches) == {"Gemm", "Conv"} and branches["Conv"].a_group == 2
    x = RNG.standard_normal((3, 12)).astype(np.float32)
    img = RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)

    w_g = codes_g.astype(np.float64) * scale_g[:, None]
    g = branches["Gemm"]
    a, b = result.model.array(g.a).astype(np.float64), result.model.array(g.b).astype(np.float64)
    expected_y = 0.5 * x @ w_g.T + bias + 0.5 * g.scale * (x @ a) @ b
    w_c = codes_c.astype(np.float64) * scale_c[:, None, None, None]
    c = branches["Conv"]
    a_c, b_c = result.model.array(c.a).astype(np.float64), result.model.array(c.b).astype(np.float64)
    # ConvA is grouped like the base; ConvB is 1x1 and grouped: a per-group channel mix
    mid = _conv_reference(img.astype(np.float64), a_c, 2) * c.scale
    rank_g, out_g = a_c.shape[0] // 2, 6 // 2
    branch_c = np.concatenate(
        [
            np.einsum(
                "or,brhw->bohw",
                b_c[j * out_g : (j + 1) * out_g, :, 0, 0],
                mid[:, j * rank_g : (j + 1) * rank_g],
            )
            for j in range(2)
        ],
        axis=1,
    )
    expected_c = _conv_reference(img.astype(np.float64), w_c, 2) + branch_c
    saved = save_model(result.model, tmp_path / "lora.onnx")
    y, conv = _session(saved, level=EXACT).run(None, {"x": x, "img": img})
    assert _rel(y, expected_y) <= 1e-5 and _rel(conv, expected_c) <= 1e-5

    merged = lora_onnx.merge(saved, output=tmp_path / "merged.onnx", dequantize=True)
    assert len(merged.folded) == 2
    assert [n.op_type for n in onnx.load(tmp_path / "merged.onnx").graph.node] == ["Gemm", "Conv"]
    y2, conv2 = _session(tmp_path / "merged.onnx", level=EXACT).run(None, {"x": x, "img": img})
    assert _rel(y2, expected_y) <= 1e-5 and _rel(conv2, expected_c) <= 1e-5


def _int4_blocked(k: int = 64, n: int = 32, block: int = 16) -> tuple[onnx.ModelProto, np.ndarray]:
    codes = RNG.integers(-8, 8, size=(k, n))
    scale = RNG.uniform(0.01, 0.1, size=(k // block, n)).astype(np.float32)
    w_q = helper.make_tensor("w_q", TensorProto.INT4, [k, n], codes.reshape(-1).tolist())
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w"], "/fc/dq", axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"], "/fc/MatMul"),
    ]
    model = _model(nodes, {"x": [4, k]}, ["y"], {"w_q": w_q, "scale": scale}, opset=21)
    return model, codes * np.repeat(scale.astype(np.float64), block, axis=0)


def test_blocked_int4_qdq_keeps_its_matmulnbits_fusion_and_folds_from_external_data(tmp_path: Path) -> None:
    model, weight = _int4_blocked()
    base_path = tmp_path / "base" / "model.onnx"
    base_path.parent.mkdir()
    onnx.save(model, base_path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    result = lora_onnx.inject(base_path, LoraConfig(rank=4, init="random", seed=3), validate=True)
    # the proof compares with the float fold, allowing what the fused int8-activation kernel rounds
    assert result.validation is not None and result.validation.ok
    lora_path = save_model(result.model, tmp_path / "lora" / "model.onnx")

    def fused_ops(path: Path) -> collections.Counter[str]:
        _session(path, opt_path=tmp_path / "optimized.onnx")
        return collections.Counter(
            n.op_type for n in onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph.node
        )

    assert fused_ops(base_path)["MatMulNBits"] == 1
    assert fused_ops(lora_path)["MatMulNBits"] == 1  # the branch leaves DQ + MatMul -> MatMulNBits intact

    x = RNG.standard_normal((4, 64)).astype(np.float32)
    lora = load_model(lora_path)
    expected = x.astype(np.float64) @ weight + _branch_term(lora, x.astype(np.float64))
    exact = _session(lora_path, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    assert _rel(exact, expected) <= 1e-5

    merged = tmp_path / "merged" / "model.onnx"
    lora_onnx.merge(lora_path, output=merged, dequantize=True)
    graph = onnx.load(merged, load_external_data=False).graph
    assert [n.op_type for n in graph.node] == ["MatMul"]
    assert {t.name: t.data_type for t in graph.initializer} == {"w_q": F}
    assert _rel(_session(merged).run(None, {"x": x})[0], expected) <= 1e-5


# ---- MatMulNBits -------------------------------------------------------------------------------------


def _nbits(
    bits: int,
    *,
    zero_points: bool,
    bias: bool,
    k: int = 40,
    n: int = 24,
    block: int = 16,
    g_idx: bool = False,
):  # type: ignore[no-untyped-def]
    """A MatMulNBits node and the float (K, N) weight it computes with (numpy, from its definition)."""
    blocks = -(-k // block)
    codes = RNG.integers(0, 1 << bits, size=(n, blocks * block)).astype(np.uint8)
    per_byte = 8 // bits

    def pack(values: np.ndarray) -> np.ndarray:
        pad = -values.shape[-1] % per_byte
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), np.uint8)], -1)
        grouped = values.reshape(*values.shape[:-1], -1, per_byte).astype(np.uint16)
        return sum(grouped[..., j] << (j * bits) for j in range(per_byte)).astype(np.uint8)

    scales = RNG.uniform(0.01, 0.05, size=(n, blocks)).astype(np.float32)
    zero = RNG.integers(0, 1 << bits, size=(n, blocks)).astype(np.uint8) if zero_points else None
    inits: dict[str, np.ndarray] = {
        "model.fc.weight_Q4": pack(codes).reshape(n, blocks, block * bits // 8),
        "model.fc.weight_scales": scales.reshape(-1),
    }
    inputs = ["x", "model.fc.weight_Q4", "model.fc.weight_scales"]
    inputs.append("model.fc.weight_zero_points" if zero_points else "")
    if zero_points:
        inits["model.fc.weight_zero_points"] = pack(zero).reshape(-1)
    inputs.append("g_idx" if g_idx else "")
    if g_idx:
        inits["g_idx"] = (np.arange(k) // block).astype(np.int32)
    if bias:
        inits["model.fc.bias"] = RNG.standard_normal(n).astype(np.float32)
        inputs.append("model.fc.bias")
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["y"],
        "/model/fc/MatMul_Q4",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
    )
    zp = zero.astype(np.float64) if zero is not None else np.full((n, blocks), float(1 << (bits - 1)))
    w_nk = ((codes - np.repeat(zp, block, 1)) * np.repeat(scales, block, 1))[:, :k]
    model = _model([node], {"x": [2, 3, k]}, ["y"], inits, ms=True)
    return model, w_nk.T, inits.get("model.fc.bias")


@pytest.mark.parametrize(
    ("bits", "zero_points", "bias"), [(4, True, True), (4, False, False), (8, True, False)]
)
def test_matmulnbits_branch_matches_numpy(tmp_path: Path, bits: int, zero_points: bool, bias: bool) -> None:
    model, weight, b = _nbits(bits, zero_points=zero_points, bias=bias)
    x = RNG.standard_normal((2, 3, 40)).astype(np.float32)
    base = x.astype(np.float64) @ weight + (b if b is not None else 0)
    assert _rel(_session(model).run(None, {"x": x})[0], base) <= 1e-5  # our reading of the format

    (site,) = lora_onnx.find_sites(model).sites
    assert (site.op, site.in_features, site.out_features, site.dtype) == ("MatMulNBits", 40, 24, F)
    assert site.module_path == "model.fc" and site.weight.node_shape == (40, 24)
    assert not lora_onnx.find_sites(model, ops={"matmul", "gemm", "conv"}).sites
    assert lora_onnx.find_sites(model, ops={"matmulnbits"}).sites == (site,)

    result = lora_onnx.inject(model, LoraConfig(rank=4, alpha=2, init="random", seed=4))
    expected = base + _branch_term(result.model, x.astype(np.float64))
    assert _rel(_run(result.model, {"x": x}, tmp_path), expected) <= 1e-5

    with pytest.raises(FoldError, match=r"quantized \(\d-bit, MatMulNBits '/model/fc/MatMul_Q4'\)"):
        fold_branches(result.model)
    kept = fold_branches(result.model, partial=True)
    assert not kept.folded and "--dequantize" in kept.kept[0].reason

    folded = fold_branches(result.model, dequantize=True).model
    graph = folded.proto.graph
    assert [n.op_type for n in graph.node] == (["MatMul", "Add"] if bias else ["MatMul"])
    weights = {t.name: (t.data_type, tuple(t.dims)) for t in graph.initializer}
    assert weights.pop("model.fc.weight_Q4") == (F, (40, 24))
    assert set(weights) == ({"model.fc.bias"} if bias else set())  # scales and zero points are gone
    assert _rel(_run(folded, {"x": x}, tmp_path), expected) <= 1e-5


def test_matmulnbits_dequantized_fold_streams_from_external_data(tmp_path: Path) -> None:
    model, weight, b = _nbits(4, zero_points=True, bias=True, k=96, n=40, block=32)
    source = tmp_path / "base" / "model.onnx"
    source.parent.mkdir()
    onnx.save(model, source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    lora = tmp_path / "lora" / "model.onnx"
    assert (
        main(["inject", str(source), "-o", str(lora), "--init", "random", "--rank", "4", "--validate"]) == 0
    )
    merged = tmp_path / "merged" / "model.onnx"
    assert main(["merge", str(lora), "-o", str(merged)]) == 2  # refused: quantized weight
    assert not merged.exists()
    assert main(["merge", str(lora), "-o", str(merged), "--dequantize", "--validate"]) == 0
    x = RNG.standard_normal((2, 3, 96)).astype(np.float32)
    expected = x.astype(np.float64) @ weight + b + _branch_term(load_model(lora), x.astype(np.float64))
    assert _rel(_session(merged).run(None, {"x": x})[0], expected) <= 1e-5
    assert (
        onnx.load(merged, load_external_data=False).graph.initializer[0].data_location == TensorProto.EXTERNAL
    )


def test_dequantized_folds_refuse_what_they_cannot_write() -> None:
    model, _, _ = _nbits(4, zero_points=False, bias=False, g_idx=True)
    result = lora_onnx.inject(model, LoraConfig(rank=2, init="random"))  # a branch is fine
    with pytest.raises(FoldError, match="g_idx"):
        fold_branches(result.model, dequantize=True)

    # one int8 tensor dequantized for two nodes, only one of them targeted
    codes = RNG.integers(-63, 64, size=(8, 8)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w"], "dq"),
        helper.make_node("MatMul", ["x", "w"], ["y"], "/a/MatMul"),
        helper.make_node("MatMul", ["y", "w"], ["z"], "/b/MatMul"),
    ]
    shared = _model(nodes, {"x": [2, 8]}, ["z"], {"w_q": codes, "scale": np.float32(0.1)})
    one = lora_onnx.inject(
        shared, LoraConfig(rank=2, init="random", targets=lora_onnx.TargetSelector(names=("a",)))
    )
    with pytest.raises(FoldError, match="shared with node '/b/MatMul'"):
        fold_branches(one.model, dequantize=True)
