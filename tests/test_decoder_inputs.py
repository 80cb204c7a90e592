"""Generated inputs for decoders with a KV cache: consistent lengths, positions, GQA inputs, token ids."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import make_model, rel_err, rng_array, run
from onnx import TensorProto, helper

import lora_onnx
from lora_onnx.proofs.decoder_inputs import DEFAULT_PAST, DEFAULT_SEQ, decoder_layout, vocab_sizes
from lora_onnx.proofs.inputs import InputSpec, make_inputs
from lora_onnx.proofs.validation import validate

F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
TOTAL = "past_sequence_length + sequence_length"


def _optimum_specs() -> list[InputSpec]:
    """The inputs of an Optimum Llama export with past key values (one layer)."""
    return [
        InputSpec("input_ids", "tensor(int64)", ("batch_size", "sequence_length")),
        InputSpec("attention_mask", "tensor(int64)", ("batch_size", TOTAL)),
        InputSpec("position_ids", "tensor(int64)", ("batch_size", "sequence_length")),
        InputSpec("past_key_values.0.key", "tensor(float)", ("batch_size", 2, "past_sequence_length", 8)),
        InputSpec("past_key_values.0.value", "tensor(float)", ("batch_size", 2, "past_sequence_length", 8)),
    ]


def test_optimum_inputs_have_consistent_lengths_and_positions_after_the_past() -> None:
    feeds = make_inputs(_optimum_specs())
    p, s = DEFAULT_PAST, DEFAULT_SEQ
    assert p != s  # a mix-up of the two lengths would not go unnoticed
    assert feeds["input_ids"].shape == (2, s) and feeds["past_key_values.0.key"].shape == (2, 2, p, 8)
    assert feeds["attention_mask"].shape == (2, p + s) and feeds["attention_mask"].all()
    assert feeds["position_ids"].tolist() == [list(range(p, p + s))] * 2


def test_dims_set_the_lengths_and_the_total_follows_or_sets_the_past() -> None:
    feeds = make_inputs(_optimum_specs(), {"sequence_length": 1, "past_sequence_length": 6}, strict=True)
    assert feeds["attention_mask"].shape == (2, 7) and feeds["position_ids"].tolist() == [[6], [6]]
    feeds = make_inputs(_optimum_specs(), {TOTAL: 10, "sequence_length": 3}, strict=True)
    assert feeds["past_key_values.0.value"].shape[2] == 7 and feeds["attention_mask"].shape == (2, 10)
    with pytest.raises(lora_onnx.LoraOnnxError, match="disagrees with past_sequence_length=2"):
        make_inputs(_optimum_specs(), {TOTAL: 10, "past_sequence_length": 2, "sequence_length": 3})
    with pytest.raises(lora_onnx.LoraOnnxError, match="leaves no past length"):
        make_inputs(_optimum_specs(), {TOTAL: 3, "sequence_length": 3})


def _gqa_graph(specs_total: str = "total_sequence_length") -> onnx.GraphProto:
    """The nodes genai's builder puts around GroupQueryAttention: an embedding table, a packed qkv MatMul
    (2 heads of 16, 1 kv head: 64 wide), the node itself reading the past inputs."""
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"], name="/embed_tokens/Gather"),
        helper.make_node("MatMul", ["h", "Wqkv"], ["qkv"], name="/attn/qkv_proj/MatMul"),
        helper.make_node(
            "GroupQueryAttention",
            ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total_seq_len"],
            ["out", "present.0.key", "present.0.value"], name="/attn/GroupQueryAttention",
            domain="com.microsoft", num_heads=2, kv_num_heads=1,
        ),
    ]  # fmt: skip
    inputs = {
        "input_ids": (I64, ["batch_size", "sequence_length"]),
        "attention_mask": (I64, ["batch_size", specs_total]),
        "past_key_values.0.key": (F, ["batch_size", 1, "past_sequence_length", "kv_cache_dim"]),
        "past_key_values.0.value": (F, ["batch_size", 1, "past_sequence_length", "kv_cache_dim"]),
        "seqlens_k": (I32, ["batch_size"]),
        "total_seq_len": (I32, []),
    }
    inits = {"embed": rng_array((5, 32), 1), "Wqkv": rng_array((32, 64), 2)}
    return helper.make_graph(  # a graph only (no onnxruntime run): onnx's checker has no contrib ops
        nodes,
        "gqa",
        [helper.make_tensor_value_info(name, elem, dims) for name, (elem, dims) in inputs.items()],
        [helper.make_tensor_value_info("out", F, None)],
        [onnx.numpy_helper.from_array(value, name) for name, value in inits.items()],
    )


def _specs(graph: onnx.GraphProto) -> list[InputSpec]:
    types = {I64: "tensor(int64)", I32: "tensor(int32)", F: "tensor(float)"}
    return [
        InputSpec(
            v.name,
            types[v.type.tensor_type.elem_type],
            tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim),
        )
        for v in graph.input
        if v.name not in {t.name for t in graph.initializer}
    ]


def test_genai_inputs_read_the_head_size_and_fill_group_query_attentions_lengths() -> None:
    graph = _gqa_graph()
    layout = decoder_layout(_specs(graph), graph)
    assert layout.fixed == {"kv_cache_dim": 16} and layout.totals == ("total_sequence_length",)
    assert layout.vocab == {"input_ids": 5} and layout.default_seq == 1
    feeds = make_inputs(_specs(graph), graph=graph)
    p = DEFAULT_PAST
    assert feeds["past_key_values.0.key"].shape == (2, 1, p, 16)
    assert feeds["input_ids"].shape == (2, 1) and feeds["attention_mask"].shape == (2, p + 1)
    assert feeds["seqlens_k"].dtype == np.int32 and feeds["seqlens_k"].tolist() == [p, p]  # total - 1
    assert feeds["total_seq_len"].shape == () and int(feeds["total_seq_len"]) == p + 1
    # without the graph the head size is unknown: today's default for a symbolic dim
    assert make_inputs(_specs(graph))["past_key_values.0.key"].shape[-1] == 8


def test_token_ids_stay_below_the_embedding_tables_rows_through_casts() -> None:
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids32"], name="/cast", to=I32),
        helper.make_node("Gather", ["table", "ids32"], ["e"], name="/embed/Gather"),
        helper.make_node("MatMul", ["e", "W"], ["y"], name="/fc/MatMul"),
    ]
    model = make_model(
        nodes,
        {"ids": (I64, ["batch", "seq"])},
        ["y"],
        {"table": rng_array((3, 4), 1), "W": rng_array((4, 2), 2)},
    )
    assert vocab_sizes(model.graph) == {"ids": 3}
    ids = make_inputs(_specs(model.graph), graph=model.graph)["ids"]
    assert ids.max() < 3 and ids.min() >= 0 and len(np.unique(ids)) > 1
    assert make_inputs(_specs(model.graph))["ids"].max() >= 3  # the table's rows are what keeps them in range
    loaded = lora_onnx.load_model(model)
    report = validate(loaded, loaded)  # ids past row 2 would fail to run
    assert report.ok


def test_token_type_ids_stay_zeros_beside_a_small_table() -> None:
    nodes = [
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"], name="/types/Gather"),
        helper.make_node("MatMul", ["t", "W"], ["y"], name="/fc/MatMul"),
    ]
    inputs = {"token_type_ids": (I64, ["batch", "seq"])}
    model = make_model(nodes, inputs, ["y"], {"types": rng_array((2, 4), 1), "W": rng_array((4, 2), 2)})
    assert vocab_sizes(model.graph) == {"token_type_ids": 2}
    assert not make_inputs(_specs(model.graph), graph=model.graph)["token_type_ids"].any()


def test_logits_to_keep_and_cache_position() -> None:
    specs = [
        *_optimum_specs(),
        InputSpec("logits_to_keep", "tensor(int64)", ()),
        InputSpec("cache_position", "tensor(int64)", ("sequence_length",)),
    ]
    feeds = make_inputs(specs, {"sequence_length": 3})
    assert int(feeds["logits_to_keep"]) == 1
    assert feeds["cache_position"].tolist() == [DEFAULT_PAST, DEFAULT_PAST + 1, DEFAULT_PAST + 2]


def test_models_without_a_cache_get_todays_inputs() -> None:
    specs = [
        InputSpec("input_ids", "tensor(int64)", ("batch", "sequence")),
        InputSpec("attention_mask", "tensor(int64)", ("batch", "sequence")),
        InputSpec("token_type_ids", "tensor(int64)", ("batch", "sequence")),
        InputSpec("position_ids", "tensor(int64)", ("batch", "sequence")),
        InputSpec("x", "tensor(float)", ("batch", 4)),
    ]
    feeds = make_inputs(specs, seed=3)
    rng = np.random.default_rng(3)
    assert np.array_equal(feeds["input_ids"], rng.integers(0, 16, size=(2, 8)))
    assert feeds["attention_mask"].all() and not feeds["token_type_ids"].any()
    assert feeds["position_ids"].tolist() == [list(range(8))] * 2
    assert np.array_equal(feeds["x"], rng.standard_normal((2, 4)).astype(np.float32))


def test_a_hand_built_cache_decoder_runs_on_generated_inputs_and_an_adapter_proves() -> None:
    """Concat(past, new) along the length, a mask Add that needs total = past + seq: inputs of
    inconsistent lengths fail to run, so a passing validation shows they agree."""
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"], name="/embed/Gather"),  # [B, S, 8]
        helper.make_node("MatMul", ["h", "Wk"], ["k"], name="/k_proj/MatMul"),  # [B, S, 8]
        helper.make_node("Unsqueeze", ["k", "one"], ["k4"], name="/k4"),  # [B, 1, S, 8]
        helper.make_node("Concat", ["past_key_values.0.key", "k4"], ["present.0.key"], name="/cat", axis=2),
        helper.make_node("ReduceSum", ["present.0.key", "minus_one"], ["scores"], name="/sum", keepdims=0),
        helper.make_node("Squeeze", ["scores", "one"], ["s2"], name="/sq"),  # [B, T]
        helper.make_node("Cast", ["attention_mask"], ["maskf"], name="/mask_cast", to=F),
        helper.make_node("Mul", ["s2", "maskf"], ["masked"], name="/mask_mul"),  # needs T = P + S
        helper.make_node("Cast", ["position_ids"], ["posf"], name="/pos_cast", to=F),
        helper.make_node("MatMul", ["masked", "Wo"], ["logits"], name="/lm_head/MatMul"),
    ]
    inputs = {
        "input_ids": (I64, ["batch_size", "sequence_length"]),
        "attention_mask": (I64, ["batch_size", TOTAL]),
        "position_ids": (I64, ["batch_size", "sequence_length"]),
        "past_key_values.0.key": (F, ["batch_size", 1, "past_sequence_length", 8]),
    }
    inits = {
        "embed": rng_array((50, 8), 1), "Wk": rng_array((8, 8), 2),
        "Wo": rng_array((DEFAULT_PAST + DEFAULT_SEQ, 3), 3),
        "one": np.array([1], np.int64), "minus_one": np.array([-1], np.int64),
    }  # fmt: skip
    model = make_model(nodes, inputs, ["logits", "present.0.key"], inits)
    feeds = make_inputs(_specs(model.graph), graph=model.graph)
    logits, present = run(model, feeds)
    assert present.shape == (2, 1, DEFAULT_PAST + DEFAULT_SEQ, 8) and logits.shape == (2, 3)
    config = lora_onnx.LoraConfig(rank=2, init="random", targets=lora_onnx.TargetSelector(names=("k_proj",)))
    result = lora_onnx.inject(model, config, validate=True)
    assert result.validation is not None and result.validation.ok
    changed = run(result.model.proto, feeds)[0]
    assert rel_err(changed, logits) > 1e-3  # the branch changes the output the proof compared
