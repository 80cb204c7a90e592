"""LoRA slots in onnxruntime: exactly the base with no adapter, any adapter swapped in per run.

One session per slotted model; adapters are ``.onnx_adapter`` files activated with
``RunOptions.add_active_adapter``. The expected output of an adapter is always the same tensors inserted
as constant branches by the core rewrite (itself checked against numpy in test_injection.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import BUNDLED, MODELS, rel_err, run
from swap_builders import load_adapter, mixed_feeds, mixed_model, run_with, session

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.commands.swap import fresh_adapter, inject_slots
from lora_onnx.model.manifest import read_branches
from lora_onnx.stages.slots import SLOT, slot_specs, strength_name


def _constant(base: onnx.ModelProto, config: LoraConfig, tmp_path: Path, name: str) -> Path:
    """The same adapter as constant branches (the core's inject), saved."""
    return lora_onnx.save_model(lora_onnx.inject(base, config).model, tmp_path / name)


def test_one_session_no_adapter_is_base_and_adapters_of_two_ranks_swap_per_run(tmp_path: Path) -> None:
    base = mixed_model()
    feeds = mixed_feeds()
    slotted = inject_slots(base, LoraConfig(rank=2), output=tmp_path / "slots.onnx")
    assert len(slotted.branches) == 5
    one, two = (
        LoraConfig(rank=2, alpha=3, init="random", seed=1),
        LoraConfig(rank=4, alpha=3, init="random", seed=2),
    )
    fresh_adapter(tmp_path / "slots.onnx", one, output=tmp_path / "one.onnx_adapter")
    fresh_adapter(tmp_path / "slots.onnx", two, output=tmp_path / "two.onnx_adapter")
    expect_one = run(_constant(base, one, tmp_path, "c1.onnx"), feeds)
    expect_two = run(_constant(base, two, tmp_path, "c2.onnx"), feeds)
    base_out = run(base, feeds)

    sess = session(tmp_path / "slots.onnx")
    adapter_one, adapter_two = (
        load_adapter(tmp_path / "one.onnx_adapter"),
        load_adapter(tmp_path / "two.onnx_adapter"),
    )
    for adapters, expected in [
        ((), base_out),
        ((adapter_one,), expect_one),
        ((adapter_two,), expect_two),
        ((), base_out),  # nothing of an earlier run's adapter stays behind
        ((adapter_one,), expect_one),
    ]:
        outputs = run_with(sess, feeds, *adapters)
        for got, want, reference in zip(outputs, expected, base_out, strict=True):
            if not adapters:
                assert np.array_equal(got, want)  # bitwise: the empty slots add exact zeros
            else:
                assert rel_err(got, want) <= 1e-4
                assert rel_err(got, reference) > 1e-3  # the adapter really changes every output
    # a batch size other than the proof's: the slots' dims are symbolic where the model's are
    other = mixed_feeds(batch=5)
    assert rel_err(run_with(sess, other, adapter_two)[0], run(tmp_path / "c2.onnx", other)[0]) <= 1e-4


def test_slot_graph_declares_symbolic_rank_inputs_with_empty_defaults() -> None:
    result = inject_slots(mixed_model(), LoraConfig(rank=2))
    graph = result.model.proto.graph
    inits = {t.name: t for t in graph.initializer}
    specs = slot_specs(result.model)
    assert len(specs) == 10
    for name, spec in specs.items():
        assert 0 in tuple(inits[name].dims)  # empty default: rank 0
        assert sum(isinstance(d, str) for d in spec.dims) == 1  # exactly the rank dim is symbolic
    assert specs["fc1.lora_A.weight"].dims == (8, "fc1.rank")
    assert specs["fc1.lora_B.weight"].dims == ("fc1.rank", 16)
    assert specs["conv.lora_A.weight"].dims == ("conv.rank", 2, 3, 3)  # grouped A, like the core's
    assert specs["conv.lora_B.weight"].dims == (6, "conv.rank_per_group", 1, 1)
    records = {r.module_path: r for r in read_branches(result.model.proto)}
    assert {r.variant for r in records.values()} == {SLOT} and all(r.rank == 0 for r in records.values())
    # no scale Mul: files carry the scale in B; only the Gemm with alpha 0.5 keeps a constant Mul
    muls = {
        r.module_path: [n for n in graph.node if n.name in r.nodes and n.op_type == "Mul"]
        for r in records.values()
    }
    assert {path: len(nodes) for path, nodes in muls.items()} == {
        "fc1": 0,
        "fc2": 1,
        "fc3": 0,
        "fc4": 0,
        "conv": 0,
    }
    (alpha_mul,) = muls["fc2"]
    assert onnx.numpy_helper.to_array(inits[alpha_mul.input[1]]) == pytest.approx(0.5)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_exact_without_adapter_and_equal_to_constant_branches_with_it(
    name: str, tmp_path: Path
) -> None:
    exclude = ("depthwise",) if name == "convnet" else ()  # 32 groups: rank 4 is not a multiple
    config = LoraConfig(rank=4, alpha=8, init="random", seed=3, targets=TargetSelector(exclude=exclude))
    model = MODELS / name / "model.onnx"
    result = inject_slots(
        model,
        config,
        output=tmp_path / "slots.onnx",
        adapter_output=tmp_path / "a.onnx_adapter",
        validate=True,
    )
    assert result.validation is not None and result.adapter_validation is not None
    assert result.validation.ok and all(c.max_abs == 0.0 for c in result.validation.comparisons)
    assert result.adapter_validation.ok
    # and through onnxruntime's own adapter API, on the saved files
    sess = session(tmp_path / "slots.onnx")
    feeds = {i.name: v for i, v in zip(sess.get_inputs(), _inputs(sess), strict=True)}
    constant = lora_onnx.save_model(lora_onnx.inject(model, config).model, tmp_path / "constant.onnx")
    (got,) = run_with(sess, feeds, load_adapter(tmp_path / "a.onnx_adapter"))
    (want,) = run(constant, feeds)
    (base,) = run(model, feeds)
    assert rel_err(got, want) <= 1e-4 and rel_err(got, base) > 1e-3
    assert np.array_equal(run_with(sess, feeds)[0], base)


def _inputs(sess) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    from lora_onnx.proofs.inputs import make_inputs
    from lora_onnx.proofs.validation import input_specs

    return list(make_inputs(input_specs(sess)).values())


def test_strength_input_blends_and_switches_an_adapter_off(tmp_path: Path) -> None:
    base = mixed_model()
    feeds = mixed_feeds()
    inject_slots(base, LoraConfig(rank=2), strength_input=True, output=tmp_path / "s.onnx")
    config = LoraConfig(rank=2, alpha=4, init="random", seed=5)
    tensors = fresh_adapter(tmp_path / "s.onnx", config, output=tmp_path / "a.onnx_adapter")
    halved = {
        name: value * np.float32(0.5) if ".lora_B." in name else value for name, value in tensors.items()
    }
    lora_onnx.adapters.files.write_adapter_file(halved, tmp_path / "half.onnx_adapter")
    sess = session(tmp_path / "s.onnx")
    assert [i.name for i in sess.get_inputs()] == ["x", "xt", "img"]  # the strength has a default
    adapter = load_adapter(tmp_path / "a.onnx_adapter")
    strength = strength_name("default")
    full = run_with(sess, feeds, adapter)
    half = run_with(sess, {**feeds, strength: np.array([0.5], np.float32)}, adapter)
    off = run_with(sess, {**feeds, strength: np.array([0.0], np.float32)}, adapter)
    expected_half = run_with(sess, feeds, load_adapter(tmp_path / "half.onnx_adapter"))
    expected_full = run(_constant(base, config, tmp_path, "c.onnx"), feeds)
    for i, reference in enumerate(run(base, feeds)):
        assert rel_err(full[i], expected_full[i]) <= 1e-4
        assert rel_err(half[i], expected_half[i]) <= 1e-5 and rel_err(half[i], full[i]) > 1e-3
        assert np.array_equal(off[i], reference)
    # a strength may also travel in the adapter file itself
    lora_onnx.adapters.files.write_adapter_file(
        {**tensors, strength: np.array([0.5], np.float32)}, tmp_path / "a_half.onnx_adapter"
    )
    in_file = run_with(sess, feeds, load_adapter(tmp_path / "a_half.onnx_adapter"))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(in_file, expected_half, strict=True))


def test_named_adapters_have_their_own_slots_and_run_alone_or_together(tmp_path: Path) -> None:
    base = mixed_model()
    feeds = mixed_feeds()
    style = LoraConfig(
        rank=2, init="random", seed=1, adapter_name="style", targets=TargetSelector(names=("fc1", "conv"))
    )
    topic = LoraConfig(
        rank=4,
        alpha=2,
        init="random",
        seed=2,
        adapter_name="topic",
        targets=TargetSelector(names=("fc1", "fc3")),
    )
    first = inject_slots(base, style, adapter_output=tmp_path / "style.onnx_adapter")
    second = inject_slots(
        first.model, topic, strength_input=True, adapter_output=tmp_path / "topic.onnx_adapter"
    )
    lora_onnx.save_model(second.model, tmp_path / "two.onnx")
    assert {b.a for b in second.branches} == {"fc1.topic.lora_A.weight", "fc3.topic.lora_A.weight"}
    assert {b.adapter for b in read_branches(second.model.proto)} == {"style", "topic"}

    only_style = run(_constant(base, style, tmp_path, "cs.onnx"), feeds)
    only_topic = run(_constant(base, topic, tmp_path, "ct.onnx"), feeds)
    both = run(
        lora_onnx.save_model(
            lora_onnx.inject(lora_onnx.inject(base, style).model, topic).model, tmp_path / "cb.onnx"
        ),
        feeds,
    )
    sess = session(tmp_path / "two.onnx")
    a_style, a_topic = (
        load_adapter(tmp_path / "style.onnx_adapter"),
        load_adapter(tmp_path / "topic.onnx_adapter"),
    )
    off_topic = {**feeds, "topic.lora_strength": np.array([0.0], np.float32)}
    for adapters, extra, expected in [
        ((a_style,), feeds, only_style),
        ((a_topic,), feeds, only_topic),
        ((a_style, a_topic), feeds, both),
        ((a_style, a_topic), off_topic, only_style),
    ]:
        for got, want in zip(run_with(sess, extra, *adapters), expected, strict=True):
            assert rel_err(got, want) <= 1e-4


def test_a_second_adapter_needs_its_own_name() -> None:
    first = inject_slots(mixed_model(), LoraConfig(rank=2))
    with pytest.raises(lora_onnx.LoraOnnxError, match="already carries an adapter named 'default'"):
        inject_slots(first.model, LoraConfig(rank=2))


def test_constant_adapter_stacked_on_slots_is_proven_and_both_apply(tmp_path: Path) -> None:
    base = mixed_model()
    feeds = mixed_feeds()
    slotted = inject_slots(base, LoraConfig(rank=2))
    fresh_adapter(
        slotted.model, LoraConfig(rank=2, init="random", seed=1), output=tmp_path / "a.onnx_adapter"
    )
    # fc3's weight is float16: its fold (the proof's reference) rounds, so it is left out here
    extra = LoraConfig(
        rank=2, init="random", seed=2, adapter_name="x", targets=TargetSelector(exclude=("fc3",))
    )
    stacked = lora_onnx.inject(slotted.model, extra, validate=True, output=tmp_path / "stacked.onnx")
    assert stacked.validation is not None and stacked.validation.ok  # proves only the new adapter's fold
    expected = run(
        _constant(
            lora_onnx.inject(base, LoraConfig(rank=2, init="random", seed=1)).model.proto,
            extra,
            tmp_path,
            "c.onnx",
        ),
        feeds,
    )
    got = run_with(session(tmp_path / "stacked.onnx"), feeds, load_adapter(tmp_path / "a.onnx_adapter"))
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) <= 1e-4


def test_float16_model_slots_take_float16_tensors_and_a_float32_strength(tmp_path: Path) -> None:
    from builders import make_model, rng_array
    from onnx import TensorProto, helper

    w = rng_array((8, 6), 1).astype(np.float16)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    base = make_model([node], {"x": (TensorProto.FLOAT16, ["batch", 8])}, ["y"], {"W": w})
    inject_slots(base, LoraConfig(rank=2), strength_input=True, output=tmp_path / "s.onnx")
    specs = slot_specs(lora_onnx.load_model(tmp_path / "s.onnx"))
    assert (
        specs["fc.lora_A.weight"].dtype == np.float16 and specs["default.lora_strength"].dtype == np.float32
    )
    tensors = fresh_adapter(
        tmp_path / "s.onnx", LoraConfig(rank=2, init="random"), output=tmp_path / "a.onnx_adapter"
    )
    a, b = tensors["fc.lora_A.weight"], tensors["fc.lora_B.weight"]
    assert a.dtype == b.dtype == np.float16
    x = rng_array((3, 8), 2).astype(np.float16)
    sess = session(tmp_path / "s.onnx")
    assert np.array_equal(run_with(sess, {"x": x})[0], run(base, {"x": x})[0])
    half = {"x": x, "default.lora_strength": np.array([0.5], np.float32)}
    (got,) = run_with(sess, half, load_adapter(tmp_path / "a.onnx_adapter"))
    expected = x.astype(np.float32) @ w.astype(np.float32) + 0.5 * (x.astype(np.float32) @ a) @ b
    assert got.dtype == np.float16 and rel_err(got, expected) <= 2e-3
