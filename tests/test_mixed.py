"""Mixed-batch branches in onnxruntime: each row equals that row alone with its adapter active.

References are independent of the mixed graph: a float64 numpy forward pass of hand-built graphs with
each row's adapter applied, and, for the bundled models, every row run alone through a slotted model
with that row's adapter file active (onnxruntime's own LoraAdapter).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import BUNDLED, MODELS, conv_reference, make_model, rel_err, rng_array, run
from mixed_builders import rows_alone_with_files, run_rows, slotted_with_files
from onnx import TensorProto, helper, numpy_helper
from swap_builders import mixed_feeds, mixed_model

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.commands.inject_mixed import inject_mixed
from lora_onnx.commands.swap import AdapterSource, fresh_source
from lora_onnx.model.load import load_model
from lora_onnx.model.manifest import read_branches
from lora_onnx.stages.stacked import ADAPTERS_DIM, INDEX_INPUT, MIXED, mixed_info

F = TensorProto.FLOAT


def _dense_conv_a(source: AdapterSource, node: str, seed: int) -> AdapterSource:
    """``source`` with the conv at ``node`` given a dense A (group 1), as PEFT makes it."""
    plans, values = [], dict(source.values)
    for plan in source.plans:
        if plan.site.node == node:
            plan = dataclasses.replace(plan, a_group=1)
            values[plan.a_name] = rng_array((plan.rank, plan.site.in_features, *plan.site.kernel), seed)
        plans.append(plan)
    return AdapterSource(tuple(plans), values, f"{source.origin} (dense conv A)")


def _branches(source: AdapterSource) -> dict[str, tuple[np.ndarray, np.ndarray, float, int, int]]:
    return {
        p.site.node: (source.values[p.a_name], source.values[p.b_name], p.scale, p.a_group, p.b_group)
        for p in source.plans
    }


def _numpy_mixed_model(
    weights: dict[str, np.ndarray], feeds: dict[str, np.ndarray], adapter: AdapterSource | None
) -> list[np.ndarray]:
    """tests/swap_builders.mixed_model in float64 numpy, with ``adapter``'s branches (core semantics:
    s * gemm_alpha * (x' A) B; conv: s * ConvB(ConvA(x)))."""
    branches = _branches(adapter) if adapter is not None else {}
    w = {k: v.astype(np.float64) for k, v in weights.items()}

    def delta(node: str, x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
        if node not in branches:
            return 0.0  # type: ignore[return-value]
        a, b, s, ga, gb = branches[node]
        if node == "/conv/Conv":
            h = conv_reference(x, a, pads=[1, 1, 1, 1], group=ga)
            return s * conv_reference(h, b, group=gb)
        return s * alpha * (x @ a.astype(np.float64)) @ b.astype(np.float64)

    x, xt, img = (feeds[k].astype(np.float64) for k in ("x", "xt", "img"))
    h = x @ w["W1"] + w["b1"] + delta("/fc1/MatMul", x)
    g = 0.5 * h @ w["W2"] + delta("/fc2/Gemm", h, 0.5)
    y = g @ w["W3"] + delta("/fc3/MatMul", g)
    z = xt.T @ w["W4"] + delta("/fc4/Gemm", xt.T)
    c = (
        conv_reference(img, w["Wc"], pads=[1, 1, 1, 1], group=2)
        + w["bc"][:, None, None]
        + delta("/conv/Conv", img)
    )
    return [y, z, c]


def test_hand_built_graph_rows_equal_numpy_with_each_rows_adapter() -> None:
    base = mixed_model()
    loaded = load_model(base)
    adapters = [
        fresh_source(loaded, LoraConfig(rank=2, alpha=3, init="random", seed=1)),
        fresh_source(
            loaded,
            LoraConfig(
                rank=4, alpha=2, init="random", seed=2, targets=TargetSelector(names=("fc2", "conv", "fc4"))
            ),
        ),
        _dense_conv_a(
            fresh_source(loaded, LoraConfig(rank=6, alpha=5, init="random", seed=3)), "/conv/Conv", seed=4
        ),
    ]
    result = inject_mixed(base, adapters, validate=True)
    assert result.validation is not None and result.validation.ok and not result.skipped
    records = {r.module_path: r for r in result.branches}
    assert {r.variant for r in records.values()} == {MIXED} and len(records) == 5
    assert records["fc1"].rank == 6 and records["fc2"].rank == 6  # the largest rank, others zero-padded
    conv = records["conv"]
    assert (conv.rank, conv.a_group, conv.b_group) == (6, 1, 2)  # grouped A's expanded beside PEFT's dense A

    weights = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    rows = [1, -1, 0, 2, 0, 2]
    feeds = mixed_feeds(batch=len(rows))
    got = run_rows(result.model.proto, feeds, rows)
    for b, r in enumerate(rows):
        row = {"x": feeds["x"][b : b + 1], "xt": feeds["xt"][:, b : b + 1], "img": feeds["img"][b : b + 1]}
        expected = _numpy_mixed_model(weights, row, None if r < 0 else adapters[r])
        base_row = _numpy_mixed_model(weights, row, None)
        for out, want, plain, axis in zip(got, expected, base_row, (0, 0, 0), strict=True):
            value = np.take(out, [b], axis=axis)
            assert rel_err(value, want) <= 1e-4
            if r < 0:
                assert rel_err(value, plain) <= 1e-5
        if r == 1:  # adapter 1 leaves fc1 / fc3 alone: output y changes through fc2 only, z and c directly
            assert rel_err(np.take(got[1], [b], axis=0), base_row[1]) > 1e-3


def test_all_base_rows_are_the_base_model_bitwise() -> None:
    base = mixed_model()
    loaded = load_model(base)
    adapters = [fresh_source(loaded, LoraConfig(rank=r, init="random", seed=r)) for r in (2, 4)]
    mixed = inject_mixed(base, adapters).model
    feeds = mixed_feeds(batch=4)
    for got, want in zip(run_rows(mixed.proto, feeds, [-1, -1, -5, -1]), run(base, feeds), strict=True):
        assert np.array_equal(got, want)  # any negative index is the base; the branch adds exact zeros


def _conv_only(group: int = 2) -> onnx.ModelProto:
    nodes = [
        helper.make_node(
            "Conv", ["img", "Wc"], ["c"], name="/conv/Conv", group=group, pads=[1, 0, 1, 0], strides=[2, 1]
        )
    ]
    return make_model(
        nodes, {"img": (F, ["batch", 4, 7, 6])}, ["c"], {"Wc": rng_array((8, 4 // group, 3, 2), 5)}
    )


@pytest.mark.parametrize(
    "forms",
    [((2, 2), (2, 2)), ((2, 2), (1, 2)), ((2, 1), (2, 1)), ((2, 1), (1, 1)), ((1, 2), (2, 1))],
    ids=lambda forms: "-".join(f"A{a}B{b}" for a, b in forms),
)
def test_conv_adapters_of_different_group_forms_share_a_site(forms: tuple[tuple[int, int], ...]) -> None:
    base = _conv_only()
    loaded = load_model(base)
    template = fresh_source(loaded, LoraConfig(rank=4, init="random")).plans[0]
    adapters = []
    for i, ((ga, gb), rank) in enumerate(zip(forms, (4, 2), strict=True)):
        plan = dataclasses.replace(template, rank=rank, scale=0.5 + i, a_group=ga, b_group=gb, stem=f"s{i}",
                                   a_name=f"s{i}.A", b_name=f"s{i}.B")  # fmt: skip
        values = {plan.a_name: rng_array(plan.a_shape, 10 + i), plan.b_name: rng_array(plan.b_shape, 20 + i)}
        adapters.append(AdapterSource((plan,), values, f"form {ga}/{gb}"))
    result = inject_mixed(base, adapters, validate=True)
    assert result.validation is not None and result.validation.ok
    rows = [0, 1, -1, 1]
    img = rng_array((len(rows), 4, 7, 6), 3)
    (got,) = run_rows(result.model.proto, {"img": img}, rows)
    w = numpy_helper.to_array(base.graph.initializer[0])
    for b, r in enumerate(rows):
        x = img[b : b + 1]
        want = conv_reference(x, w, pads=[1, 0, 1, 0], strides=[2, 1], group=2)
        if r >= 0:
            (plan,), values = adapters[r].plans, adapters[r].values
            h = conv_reference(x, values[plan.a_name], pads=[1, 0, 1, 0], strides=[2, 1], group=plan.a_group)
            want = want + plan.scale * conv_reference(h, values[plan.b_name], group=plan.b_group)
        assert rel_err(got[b : b + 1], want) <= 1e-4


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_rows_equal_the_slotted_model_with_each_file_active(name: str, tmp_path: Path) -> None:
    model = MODELS / name / "model.onnx"
    exclude = ("depthwise",) if name == "convnet" else ()  # 32 groups: these ranks are no multiple of 32
    drop = {"tiny_llama": "mlp", "tiny_bert": "attention", "tiny_gpt2": "attn", "convnet": "conv"}[name]
    slots, files = slotted_with_files(model, tmp_path, (4, 8, 12), exclude=exclude, drop=(drop,))
    result = inject_mixed(slots, files, output=tmp_path / "mixed.onnx")
    assert not result.skipped and result.output is not None
    assert all(b.variant == MIXED for b in read_branches(result.model.proto))  # the slots are gone
    sess_inputs = {
        i.name
        for i in ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"]).get_inputs()
    }
    assert INDEX_INPUT in sess_inputs and not any(n.endswith(".lora_A.weight") for n in sess_inputs)

    rows = [2, -1, 0, 1, 0]
    feeds = _feeds(model, len(rows))
    (got,) = run_rows(result.output, feeds, rows)
    alone = rows_alone_with_files(slots, files, feeds, rows)
    (base,) = run(model, feeds)
    for b, r in enumerate(rows):
        assert rel_err(got[b : b + 1], alone[b][0]) <= 1e-4
        if r >= 0:
            assert rel_err(alone[b][0], base[b : b + 1]) > 1e-3  # the adapter really changes the row
        else:
            assert np.array_equal(got[b : b + 1], base[b : b + 1])


def _feeds(model: Path, batch: int) -> dict[str, np.ndarray]:
    from lora_onnx.proofs.inputs import make_inputs
    from lora_onnx.proofs.validation import input_specs

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return make_inputs(input_specs(sess), {"batch": batch, "sequence": 6}, seed=4)


def test_index_length_and_range_are_checked_at_run_time() -> None:
    base = mixed_model()
    loaded = load_model(base)
    mixed = inject_mixed(
        base, [fresh_source(loaded, LoraConfig(rank=2, init="random", seed=s)) for s in (1, 2)]
    )
    feeds = mixed_feeds(batch=3)
    with pytest.raises(Exception, match=r"(?s)index\.in_range.*out of data bounds"):
        run_rows(mixed.model.proto, feeds, [0, 2, 1])  # only 2 adapters
    with pytest.raises(Exception, match=r"(?s)index\.per_row.*cannot be reshaped"):
        run_rows(mixed.model.proto, feeds, [0, 1])  # 2 entries for 3 rows


def test_graph_declares_the_index_and_records_the_stacks(tmp_path: Path) -> None:
    base = mixed_model()
    loaded = load_model(base)
    adapters = [fresh_source(loaded, LoraConfig(rank=r, init="random", seed=r)) for r in (2, 3)]
    result = inject_mixed(base, adapters, stacks_as_inputs=True, output=tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(proto)
    inputs = {v.name: v for v in proto.graph.input}
    index = inputs[INDEX_INPUT].type.tensor_type
    assert index.elem_type == TensorProto.INT64 and [d.dim_param for d in index.shape.dim] == ["batch"]
    fc1 = next(r for r in result.branches if r.module_path == "fc1")
    a_dims = [d.dim_param or d.dim_value for d in inputs[fc1.a].type.tensor_type.shape.dim]
    assert a_dims == [ADAPTERS_DIM, 8, "fc1.rank"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits[fc1.a].shape == (2, 8, 3) and inits[fc1.b].shape == (2, 3, 16)
    assert not inits[fc1.a][0][:, 2:].any()  # adapter 0 has rank 2: padded with zeros
    info = mixed_info(load_model(tmp_path / "m.onnx"))
    assert info is not None and info.count == 2 and info.stacks_as_inputs and info.batch_input == "x"
    assert set(info.nodes) <= {n.name for n in proto.graph.node}


def test_opset_too_old_and_models_without_a_batch_dim_are_refused() -> None:
    old = mixed_model()
    old.opset_import[0].version = 10
    with pytest.raises(lora_onnx.LoraOnnxError, match="opset 11"):
        inject_mixed(old, [fresh_source(load_model(mixed_model()), LoraConfig(rank=2, init="random"))])
    # A fixed batch is a batch (tests/test_static_batch.py); an input without a declared shape has none.
    shapeless = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
        {"x": (F, [2, 4])},
        ["y"],
        {"W": rng_array((4, 3), 1)},
    )
    shapeless.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(lora_onnx.LoraOnnxError, match="symbolic batch dim or a fixed one"):
        inject_mixed(shapeless, [fresh_source(load_model(shapeless), LoraConfig(rank=2, init="random"))])


def test_float16_sites_stack_float16_tensors() -> None:
    h = TensorProto.FLOAT16
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul"),
        helper.make_node("Conv", ["img", "Wc"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
    ]
    inits = {
        "W": rng_array((8, 6), 1).astype(np.float16),
        "Wc": rng_array((4, 3, 3, 3), 2).astype(np.float16),
    }
    base = make_model(nodes, {"x": (h, ["batch", 8]), "img": (h, ["batch", 3, 5, 5])}, ["y", "c"], inits)
    loaded = load_model(base)
    adapters = [fresh_source(loaded, LoraConfig(rank=r, alpha=r, init="random", seed=r)) for r in (2, 4)]
    result = inject_mixed(base, adapters, validate=True)
    assert result.validation is not None and result.validation.ok
    assert {result.model.array(b.a).dtype for b in result.branches} == {np.dtype(np.float16)}
    rows = [1, -1, 0]
    feeds = {
        "x": rng_array((3, 8), 3).astype(np.float16),
        "img": rng_array((3, 3, 5, 5), 4).astype(np.float16),
    }
    y, c = run_rows(result.model.proto, feeds, rows)
    assert y.dtype == c.dtype == np.float16
    for b, r in enumerate(rows):
        x, img = feeds["x"][b : b + 1].astype(np.float64), feeds["img"][b : b + 1]
        want_y = x @ inits["W"].astype(np.float64)
        want_c = conv_reference(img, inits["Wc"], pads=[1, 1, 1, 1])
        if r >= 0:
            branches = _branches(adapters[r])
            a, bb, s, _, _ = branches["/fc/MatMul"]
            want_y = want_y + s * (x @ a.astype(np.float64)) @ bb.astype(np.float64)
            a, bb, s, ga, gb = branches["/conv/Conv"]
            want_c = want_c + s * conv_reference(
                conv_reference(img, a, pads=[1, 1, 1, 1], group=ga), bb, group=gb
            )
        assert rel_err(y[b : b + 1], want_y) <= 5e-3 and rel_err(c[b : b + 1], want_c) <= 5e-3
