"""Injected branches compute exactly y = base(x) + s * B(A(x)): checked in onnxruntime against numpy."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from builders import conv_reference, make_model, rel_err, rng_array, run
from onnx import TensorProto, helper

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.errors import LoraOnnxError, TargetError
from lora_onnx.model.manifest import read_branches

F = TensorProto.FLOAT


def tensor(model: lora_onnx.LoadedModel, name: str) -> np.ndarray:
    return model.array(name)


def only_branch(result: lora_onnx.InjectResult):
    assert len(result.branches) == 1
    return result.branches[0]


@pytest.mark.parametrize("bias", [None, "first", "second"])
def test_matmul_nd_input_matches_numpy(bias: str | None) -> None:
    w, b = rng_array((16, 24), 1), rng_array((24,), 2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm" if bias else "y"], name="/fc/MatMul")]
    if bias:
        ins = ["b", "mm"] if bias == "first" else ["mm", "b"]
        nodes.append(helper.make_node("Add", ins, ["y"], name="/fc/Add"))
    model = make_model(nodes, {"x": (F, [2, 3, 16])}, ["y"], {"W": w, "b": b} if bias else {"W": w})
    result = lora_onnx.inject(model, LoraConfig(rank=4, alpha=6, init="random", seed=3))
    branch = only_branch(result)
    a, bb = tensor(result.model, branch.a), tensor(result.model, branch.b)
    assert a.shape == (16, 4) and bb.shape == (4, 24) and branch.scale == pytest.approx(1.5)
    x = rng_array((2, 3, 16), 4)
    expected = x @ w + (b if bias else 0) + 1.5 * (x @ a) @ bb
    (actual,) = run(result.model.proto, {"x": x})
    assert rel_err(actual, expected) <= 1e-5
    # 3-D input: the branch joins before the bias Add, which stays next to what onnxruntime fuses it with
    if bias:
        assert branch.join == "mm" and any(
            n.name == "/fc/MatMul" and "mm.lora_base" in n.output for n in result.model.proto.graph.node
        )


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "with_c"),
    list(itertools.product([0, 1], [0, 1], [1.0, 0.5], [1.0, 0.25], [True, False])),
)
def test_gemm_every_attribute_combination(
    trans_a: int, trans_b: int, alpha: float, beta: float, with_c: bool
) -> None:
    m, k, n = 3, 10, 7
    w = rng_array((n, k) if trans_b else (k, n), 1)
    c = rng_array((n,), 2)
    inputs = ["x", "W", "C"] if with_c else ["x", "W"]
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="/fc/Gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    inits = {"W": w, "C": c} if with_c else {"W": w}
    model = make_model([node], {"x": (F, [k, m] if trans_a else [m, k])}, ["y"], inits)
    result = lora_onnx.inject(model, LoraConfig(rank=3, alpha=6, init="random"))
    branch = only_branch(result)
    site = result.scan.sites[0]
    assert (site.in_features, site.out_features) == (k, n)
    assert site.layout == ("out,in" if trans_b else "in,out")
    a, b = tensor(result.model, branch.a), tensor(result.model, branch.b)
    x = rng_array((k, m) if trans_a else (m, k), 5)
    xa = x.T if trans_a else x
    wa = w.T if trans_b else w
    expected = alpha * xa @ wa + (beta * c if with_c else 0) + 2.0 * alpha * (xa @ a) @ b
    (actual,) = run(result.model.proto, {"x": x})
    assert rel_err(actual, expected) <= 1e-5


CONV_CASES = {
    "1d": dict(x=(2, 4, 11), w=(6, 4, 3), attrs={}),
    "1d_strided_padded": dict(x=(1, 4, 12), w=(5, 4, 5), attrs=dict(strides=[2], pads=[2, 1])),
    "2d_stride_pad": dict(x=(2, 3, 9, 8), w=(8, 3, 3, 3), attrs=dict(strides=[2, 1], pads=[1, 0, 1, 2])),
    "2d_dilated": dict(x=(1, 4, 10, 10), w=(4, 4, 3, 3), attrs=dict(dilations=[2, 3], pads=[2, 2, 2, 2])),
    "2d_same_upper": dict(x=(1, 3, 7, 6), w=(4, 3, 4, 3), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "2d_same_lower": dict(x=(1, 3, 7, 6), w=(4, 3, 4, 2), attrs=dict(auto_pad="SAME_LOWER")),
    "2d_valid": dict(x=(1, 3, 7, 6), w=(4, 3, 3, 3), attrs=dict(auto_pad="VALID")),
    "2d_grouped": dict(x=(2, 8, 6, 6), w=(12, 2, 3, 3), attrs=dict(group=4, pads=[1, 1, 1, 1])),
    "2d_depthwise": dict(
        x=(1, 8, 7, 7), w=(8, 1, 3, 3), attrs=dict(group=8, strides=[2, 2], pads=[1, 1, 1, 1])
    ),
    "2d_1x1": dict(x=(1, 6, 5, 5), w=(3, 6, 1, 1), attrs={}),
    "3d": dict(x=(1, 2, 5, 6, 4), w=(4, 2, 3, 2, 3), attrs=dict(pads=[1, 0, 1, 1, 1, 1], strides=[1, 2, 1])),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_matches_numpy_reference(case: str, with_bias: bool) -> None:
    spec = CONV_CASES[case]
    attrs = spec["attrs"]
    w = rng_array(spec["w"], 1)
    bias = rng_array((spec["w"][0],), 2)
    inputs = ["x", "W", "B"] if with_bias else ["x", "W"]
    node = helper.make_node("Conv", inputs, ["y"], name="/conv/Conv", **attrs)
    model = make_model(
        [node], {"x": (F, list(spec["x"]))}, ["y"], {"W": w, "B": bias} if with_bias else {"W": w}
    )
    group = attrs.get("group", 1)
    rank = 8 if group in (4, 8) else 2
    result = lora_onnx.inject(model, LoraConfig(rank=rank, alpha=3, init="random", seed=2))
    branch = only_branch(result)
    a, b = tensor(result.model, branch.a), tensor(result.model, branch.b)
    channels = spec["x"][1]
    assert a.shape == (rank, channels // group, *spec["w"][2:])
    assert b.shape == (spec["w"][0], rank // group, *([1] * (len(spec["x"]) - 2)))
    x = rng_array(spec["x"], 7)
    conv_attrs = {k: v for k, v in attrs.items() if k != "group"}
    expected = conv_reference(x, w, group=group, **conv_attrs)
    expected = expected + (bias.reshape(1, -1, *([1] * (x.ndim - 2))) if with_bias else 0)
    low = conv_reference(x, a, group=group, **conv_attrs)
    expected = expected + (3 / rank) * conv_reference(low, b, group=group)
    (actual,) = run(result.model.proto, {"x": x})
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= 1e-5


def _chain_model(chain: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """MatMul(x, chain(W)) where the chain is Identity, Transpose or Cast (fp16 storage)."""
    if chain == "transpose":
        source = rng_array((12, 8), 1)  # stored (out, in); the node sees (in, out)
        nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0])]
    elif chain == "cast":
        source = rng_array((8, 12), 1).astype(np.float16)
        nodes = [helper.make_node("Cast", ["W"], ["Wt"], name="c", to=TensorProto.FLOAT)]
    else:
        source = rng_array((8, 12), 1)
        nodes = [helper.make_node("Identity", ["W"], ["Wt"], name="i")]
    nodes.append(helper.make_node("MatMul", ["x", "Wt"], ["y"], name="/proj/MatMul"))
    return make_model(nodes, {"x": (F, [3, 8])}, ["y"], {"W": source}), source


@pytest.mark.parametrize("chain", ["identity", "transpose", "cast"])
def test_weight_chains_are_traced_and_branch_uses_node_dtype(chain: str) -> None:
    model, source = _chain_model(chain)
    result = lora_onnx.inject(model, LoraConfig(rank=2, init="random"))
    branch = only_branch(result)
    site = result.scan.sites[0]
    assert site.weight.initializer == "W" and site.weight.transposed == (chain == "transpose")
    a, b = tensor(result.model, branch.a), tensor(result.model, branch.b)
    assert a.dtype == np.float32 and b.dtype == np.float32  # the dtype the MatMul computes in
    w_node = source.T if chain == "transpose" else source.astype(np.float32)
    x = rng_array((3, 8), 3)
    (actual,) = run(result.model.proto, {"x": x})
    assert rel_err(actual, x @ w_node + (x @ a) @ b) <= 1e-5


def test_default_init_leaves_outputs_unchanged_and_b_is_zero() -> None:
    w = rng_array((16, 16), 1)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    model = make_model([node], {"x": (F, [4, 16])}, ["y"], {"W": w})
    result = lora_onnx.inject(model, LoraConfig(rank=4))
    branch = only_branch(result)
    assert branch.zero_init and not np.any(tensor(result.model, branch.b))
    assert np.any(tensor(result.model, branch.a))
    x = rng_array((4, 16), 2)
    assert np.array_equal(run(result.model.proto, {"x": x})[0], run(model, {"x": x})[0])


def test_rslora_and_rank_alpha_patterns_set_each_sites_scale() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/layers.0/q_proj/MatMul"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="/layers.0/v_proj/MatMul"),
    ]
    model = make_model(
        nodes, {"x": (F, [2, 8])}, ["y"], {"W1": rng_array((8, 8), 1), "W2": rng_array((8, 16), 2)}
    )
    config = LoraConfig(
        rank=4, alpha=8, use_rslora=True, rank_pattern={"v_proj": 16}, alpha_pattern={"q_proj": 2}
    )
    result = lora_onnx.inject(model, config)
    by_path = {b.module_path: b for b in result.branches}
    q, v = by_path["layers.0.q_proj"], by_path["layers.0.v_proj"]
    assert (q.rank, q.alpha, q.scale) == (4, 2, pytest.approx(2 / 2))
    assert (v.rank, v.alpha, v.scale) == (16, 8, pytest.approx(8 / 4))
    assert tensor(result.model, v.a).shape == (8, 16)


def test_targets_follow_peft_matching_and_names_derive_from_module_paths() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/model/q_proj/MatMul"),
        helper.make_node("MatMul", ["h", "W2"], ["h2"], name="/model/my_q_proj/MatMul"),
        helper.make_node("MatMul", ["h2", "W3"], ["y"], name="/model/v_proj/MatMul"),
    ]
    inits = {f"W{i}": rng_array((8, 8), i) for i in (1, 2, 3)}
    model = make_model(nodes, {"x": (F, [2, 8])}, ["y"], inits)
    result = lora_onnx.inject(model, LoraConfig(targets=TargetSelector(names=("q_proj",))))
    assert [b.module_path for b in result.branches] == ["model.q_proj"]  # not my_q_proj
    assert result.branches[0].a == "model.q_proj.lora_A.weight"
    regex = lora_onnx.inject(model, LoraConfig(targets=TargetSelector(regex=r".*_proj", exclude=("v_proj",))))
    assert [b.module_path for b in regex.branches] == ["model.q_proj", "model.my_q_proj"]
    again = lora_onnx.inject(model, LoraConfig(targets=TargetSelector(regex=r".*_proj", exclude=("v_proj",))))
    assert [b.a for b in again.branches] == [b.a for b in regex.branches]  # stable across runs


def test_unmatched_target_is_an_error_naming_nearest_paths() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/model/q_proj/MatMul")
    model = make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8))})
    with pytest.raises(TargetError, match=r"q_prj.*nearest module paths: model\.q_proj"):
        lora_onnx.inject(model, LoraConfig(targets=TargetSelector(names=("q_prj",))))


def test_second_adapter_needs_another_name_and_stacks_on_the_first() -> None:
    w = rng_array((8, 8), 1)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    model = make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": w})
    first = lora_onnx.inject(model, LoraConfig(rank=2, init="random"))
    with pytest.raises(LoraOnnxError, match="already carries an adapter named 'default'"):
        lora_onnx.inject(first.model, LoraConfig(rank=2))
    second = lora_onnx.inject(first.model, LoraConfig(rank=3, init="random", adapter_name="style", seed=5))
    assert second.branches[0].a == "fc.style.lora_A.weight"
    assert len(read_branches(second.model.proto)) == 2
    x = rng_array((2, 8), 2)
    a1, b1 = tensor(first.model, "fc.lora_A.weight"), tensor(first.model, "fc.lora_B.weight")
    a2, b2 = tensor(second.model, "fc.style.lora_A.weight"), tensor(second.model, "fc.style.lora_B.weight")
    (actual,) = run(second.model.proto, {"x": x})
    assert rel_err(actual, x @ w + (x @ a1) @ b1 + (x @ a2) @ b2) <= 1e-5


def test_caller_model_is_not_modified() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    model = make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8))})
    before = model.SerializeToString()
    lora_onnx.inject(model, LoraConfig(init="random"))
    assert model.SerializeToString() == before


def test_opsets_without_broadcasting_are_refused_with_a_fix() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    model = make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8))}, opset=6)
    with pytest.raises(LoraOnnxError, match=r"opset 6; .*onnx\.version_converter"):
        lora_onnx.inject(model, LoraConfig())


def test_proof_allows_for_half_precision_storage_of_folded_weights() -> None:
    model, _ = _chain_model("cast")  # fp16 weight, Cast to float32: the fold rounds W + delta to fp16
    result = lora_onnx.inject(model, LoraConfig(rank=2, alpha=8, init="random"), validate=True)
    assert result.validation.ok
    assert {c.rtol for c in result.validation.comparisons} == {1e-2}


def test_an_output_that_is_the_input_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    from lora_onnx.commands import inject as injection
    from lora_onnx.errors import OutputError

    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    path = tmp_path / "m.onnx"
    path.write_bytes(
        make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8))}).SerializeToString()
    )
    monkeypatch.setattr(injection, "plan_branches", lambda *a, **k: pytest.fail("planned before refusing"))
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        lora_onnx.inject(path, LoraConfig(), output=path, validate=True)
