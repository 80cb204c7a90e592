"""PEFT modules_to_save: saved whole modules replace the base's tensors (new initializers, only that
module's nodes rewired), unmerged and merged, against numpy and against PEFT's own PyTorch outputs; the
export writes them back; run-time slots refuse them."""

from __future__ import annotations

import copy
import io
import json
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rel_err, rng_array, run, write_adapter
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

import lora_onnx
from lora_onnx import apply_peft
from lora_onnx.adapters.peft import export_peft_adapter
from lora_onnx.adapters.peft.modules_to_save import SAVED_KEY_PREFIX, read_saved
from lora_onnx.cli.main import main
from lora_onnx.errors import AdapterError

F = TensorProto.FLOAT
X = rng_array((2, 8), 10)
LORA = {
    "base_model.model.enc.q.lora_A.weight": rng_array((2, 8), 1),
    "base_model.model.enc.q.lora_B.weight": rng_array((6, 2), 2),
}
HEAD = {
    "base_model.model.classifier.weight": rng_array((3, 6), 3),
    "base_model.model.classifier.bias": rng_array((3,), 4),
}
SCALE = 4 / 2  # write_adapter's lora_alpha / r


def _head_model(op: str = "Gemm", bias: bool = True) -> onnx.ModelProto:
    """x -> enc.q (MatMul) -> classifier (Gemm transB=1, or MatMul on a pre-transposed weight + Add)."""
    inits = {"W": rng_array((8, 6), 5), "Wc": rng_array((3, 6), 6), "bc": rng_array((3,), 7)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="/enc/q/MatMul")]
    if op == "Gemm":
        inputs = ["h", "Wc", "bc"] if bias else ["h", "Wc"]
        nodes.append(helper.make_node("Gemm", inputs, ["y"], name="/classifier/Gemm", transB=1))
    else:
        inits["Wc_t"] = np.ascontiguousarray(inits.pop("Wc").T)
        out = "mm" if bias else "y"
        nodes.append(helper.make_node("MatMul", ["h", "Wc_t"], [out], name="/classifier/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", ["bc", "mm"], ["y"], name="/classifier/Add"))
    if not bias:
        inits.pop("bc")
    return make_model(nodes, {"x": (F, ["batch", 8])}, ["y"], inits)


def _expected(head: dict[str, np.ndarray]) -> np.ndarray:
    a, b = LORA["base_model.model.enc.q.lora_A.weight"], LORA["base_model.model.enc.q.lora_B.weight"]
    h = X @ rng_array((8, 6), 5) + SCALE * (X @ a.T) @ b.T
    y = h @ head["base_model.model.classifier.weight"].T
    bias = head.get("base_model.model.classifier.bias")
    return y + bias if bias is not None else y


def _adapter(tmp_path: Path, head: dict[str, np.ndarray] = HEAD, name: str = "a", **config: object) -> Path:
    config.setdefault("modules_to_save", ["classifier"])
    return write_adapter(tmp_path / name, {**LORA, **head}, **config)


@pytest.mark.parametrize(
    ("op", "bias"), [("Gemm", True), ("MatMul", True), ("Gemm", False), ("MatMul", False)]
)
def test_saved_head_replaces_the_base_tensors_unmerged_and_merged(
    tmp_path: Path, op: str, bias: bool
) -> None:
    base = _head_model(op, bias)
    before = base.SerializeToString()
    head = (
        HEAD if bias else {"base_model.model.classifier.weight": HEAD["base_model.model.classifier.weight"]}
    )
    folder = _adapter(tmp_path, head)
    expected = _expected(head)
    for merge in (False, True):
        result = apply_peft(
            base, folder, output=tmp_path / f"{op}{bias}{merge}.onnx", merge=merge, validate=True
        )
        assert result.validation is not None and result.validation.ok
        proto = onnx.load(tmp_path / f"{op}{bias}{merge}.onnx")
        assert rel_err(run(proto, {"x": X})[0], expected) <= 1e-5
        names = {t.name for t in proto.graph.initializer}
        assert not names & {"Wc", "Wc_t", "bc"}  # the replaced base tensors are gone, not kept beside
        assert any(key.startswith(SAVED_KEY_PREFIX) for key in (p.key for p in proto.metadata_props)) != merge
    assert base.SerializeToString() == before  # the input model is never changed


def test_an_exporter_dropped_zero_bias_gets_its_place(tmp_path: Path) -> None:
    # dynamo drops a Linear's all-zero bias; PEFT still saves the (now trained) bias
    for op in ("Gemm", "MatMul"):
        base = _head_model(op, bias=False)
        result = apply_peft(base, _adapter(tmp_path, name=op), output=tmp_path / f"{op}.onnx")
        proto = onnx.load(tmp_path / f"{op}.onnx")
        assert rel_err(run(proto, {"x": X})[0], _expected(HEAD)) <= 1e-5
        saved = {t.param: t for t in result.peft.saved}
        assert set(saved) == {"weight", "bias"} and saved["bias"].replaces == ""


def test_key_styles_and_export_round_trip(tmp_path: Path) -> None:
    base = _head_model("MatMul")  # the weight is stored transposed: the export must undo it
    old_style = {k.replace("classifier.", "classifier.modules_to_save.default."): v for k, v in HEAD.items()}
    for name, head in (("new", HEAD), ("old", old_style)):
        folder = _adapter(tmp_path, head, name=name)
        apply_peft(base, folder, output=tmp_path / f"{name}.onnx")
        assert rel_err(run(tmp_path / f"{name}.onnx", {"x": X})[0], _expected(HEAD)) <= 1e-5
        back = export_peft_adapter(tmp_path / f"{name}.onnx", tmp_path / f"{name}_back")
        original, exported = (
            load_file(folder / "adapter_model.safetensors"),
            load_file(back / "adapter_model.safetensors"),
        )
        assert sorted(original) == sorted(exported)
        for key, value in original.items():
            assert np.array_equal(value, exported[key]), key
        config = json.loads((back / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["classifier"]


def test_only_the_saved_modules_nodes_are_rewired(tmp_path: Path) -> None:
    # One initializer serves the head's bias and another module (exporters deduplicate equal tensors).
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="/enc/q/MatMul"),
        helper.make_node("Gemm", ["h", "Wc", "b3"], ["y"], name="/classifier/Gemm", transB=1),
        helper.make_node("Add", ["y", "b3"], ["z"], name="/other/Add"),
    ]
    inits = {"W": rng_array((8, 6), 5), "Wc": rng_array((3, 6), 6), "b3": rng_array((3,), 7)}
    base = make_model(nodes, {"x": (F, ["batch", 8])}, ["z"], inits)
    apply_peft(base, _adapter(tmp_path), output=tmp_path / "o.onnx")
    proto = onnx.load(tmp_path / "o.onnx")
    by_name = {node.name: node for node in proto.graph.node}
    assert by_name["/other/Add"].input[1] == "b3" and by_name["/classifier/Gemm"].input[2] != "b3"
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert np.array_equal(stored["b3"], inits["b3"])
    assert rel_err(run(proto, {"x": X})[0], _expected(HEAD) + inits["b3"]) <= 1e-5


def test_norm_and_embedding_modules(tmp_path: Path) -> None:
    # Gather (an Embedding) -> LayerNormalization -> MatMul: the saved embedding and norm replace theirs.
    dim, vocab = 6, 10
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="/embed/Gather"),
        helper.make_node("LayerNormalization", ["e", "ln_w", "ln_b"], ["n"], name="/norm/LayerNormalization"),
        helper.make_node("MatMul", ["n", "W"], ["y"], name="/enc/q/MatMul"),
    ]
    inits = {
        "emb": rng_array((vocab, dim), 1),
        "ln_w": np.ones(dim, np.float32),
        "ln_b": np.zeros(dim, np.float32),
    }
    inits["W"] = rng_array((dim, 4), 2)
    base = make_model(nodes, {"ids": (TensorProto.INT64, ["batch", 3])}, ["y"], inits)
    saved = {
        "base_model.model.embed.weight": rng_array((vocab, dim), 3),
        "base_model.model.norm.weight": rng_array((dim,), 4),
        "base_model.model.norm.bias": rng_array((dim,), 5),
    }
    lora = {
        "base_model.model.enc.q.lora_A.weight": rng_array((2, dim), 6),
        "base_model.model.enc.q.lora_B.weight": rng_array((4, 2), 7),
    }
    folder = write_adapter(tmp_path / "a", {**lora, **saved}, modules_to_save=["embed", "norm"])
    ids = np.array([[1, 4, 9], [0, 2, 2]], np.int64)
    e = saved["base_model.model.embed.weight"][ids]
    mean, var = e.mean(-1, keepdims=True), e.var(-1, keepdims=True)
    n = (e - mean) / np.sqrt(var + 1e-5) * saved["base_model.model.norm.weight"] + saved[
        "base_model.model.norm.bias"
    ]
    a, b = lora["base_model.model.enc.q.lora_A.weight"], lora["base_model.model.enc.q.lora_B.weight"]
    expected = n @ inits["W"] + SCALE * (n @ a.T) @ b.T
    for merge in (False, True):
        apply_peft(base, folder, output=tmp_path / f"{merge}.onnx", merge=merge)
        assert rel_err(run(tmp_path / f"{merge}.onnx", {"ids": ids})[0], expected) <= 1e-5


def test_saved_modules_that_do_not_fit_are_refused_by_name(tmp_path: Path) -> None:
    base = _head_model("Gemm")
    wrong = {**HEAD, "base_model.model.classifier.weight": rng_array((5, 6), 3)}
    with pytest.raises(AdapterError) as info:
        apply_peft(base, _adapter(tmp_path, wrong, name="shape"))
    message = str(info.value)
    assert (
        "'base_model.model.classifier.weight' has shape [5, 6]" in message and "'/classifier/Gemm'" in message
    )
    assert "[3, 6]" in message and "number of labels" in message
    elsewhere = {"base_model.model.score.weight": rng_array((3, 6), 3)}
    with pytest.raises(AdapterError, match="modules_to_save copy of module 'score', which matches no module"):
        apply_peft(base, _adapter(tmp_path, elsewhere, name="none", modules_to_save=["score"]))
    buffer = {**HEAD, "base_model.model.classifier.running_mean": rng_array((3,), 3)}
    with pytest.raises(AdapterError, match="modules_to_save buffer"):
        apply_peft(base, _adapter(tmp_path, buffer, name="buffer"))
    scaled = _head_model("Gemm")
    helper_attr = helper.make_attribute("alpha", 0.5)
    next(n for n in scaled.graph.node if n.op_type == "Gemm").attribute.append(helper_attr)
    with pytest.raises(AdapterError, match=r"alpha=0\.5"):
        apply_peft(scaled, _adapter(tmp_path, name="alpha"))


def test_slots_and_adapter_files_refuse_saved_modules(tmp_path: Path) -> None:
    base = _head_model("Gemm")
    folder = _adapter(tmp_path)
    with pytest.raises(
        AdapterError, match="no run-time slot or mixed-batch form; apply the adapter as constant"
    ):
        lora_onnx.inject_slots(base, peft=folder)
    with pytest.raises(AdapterError, match="no run-time slot or mixed-batch form"):
        lora_onnx.inject_mixed(base, [folder, folder])
    constant = tmp_path / "constant.onnx"
    apply_peft(base, folder, output=constant)
    with pytest.raises(AdapterError, match="cannot carry; export it as a PEFT folder"):
        lora_onnx.export_adapter(constant, tmp_path / "x.onnx_adapter")


def test_a_later_merge_keeps_the_saved_module_and_drops_its_record(tmp_path: Path) -> None:
    base = _head_model("MatMul")
    unmerged = tmp_path / "u.onnx"
    apply_peft(base, _adapter(tmp_path), output=unmerged)
    assert read_saved(onnx.load(unmerged), "default")
    merged = lora_onnx.merge(unmerged, output=tmp_path / "m.onnx", validate=True)
    assert merged.validation is not None and merged.validation.ok
    proto = onnx.load(tmp_path / "m.onnx")
    assert not read_saved(proto, "default")
    assert rel_err(run(proto, {"x": X})[0], _expected(HEAD)) <= 1e-5
    with pytest.raises(AdapterError, match="already replaced by adapter 'default'"):
        apply_peft(unmerged, _adapter(tmp_path, name="b"), adapter_name="second")


def test_cli_applies_and_merges_a_classification_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "base.onnx"
    onnx.save(_head_model("Gemm"), model)
    folder = _adapter(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["inject", str(model), "--peft", str(folder), "--merge", "--validate", "-o", str(out)]) == 0
    assert "modules_to_save: 2 tensor(s) of classifier replace the base's" in capsys.readouterr().out
    assert rel_err(run(out, {"x": X})[0], _expected(HEAD)) <= 1e-5
    assert (
        main(["inject", str(model), "--as-inputs", "--peft", str(folder), "-o", str(tmp_path / "s.onnx")])
        == 2
    )
    assert "modules_to_save copy of module 'classifier'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Against PEFT (torch)


def _export(module, args, names, path: Path, dynamo: bool) -> None:  # type: ignore[no-untyped-def]
    import torch

    kwargs = {"input_names": names, "output_names": ["logits"], "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = {
            n: {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=64)} for n in names
        }
    else:
        kwargs["dynamic_axes"] = {n: {0: "batch", 1: "seq"} for n in names}
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), **kwargs)


def _classifier(arch: str):  # type: ignore[no-untyped-def]
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if arch == "bert":
        config = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            num_labels=3, attn_implementation="eager",
        )  # fmt: skip
        return BertForSequenceClassification(config).eval(), ["query", "value"]
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, num_labels=3, pad_token_id=0, use_cache=False, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForSequenceClassification(config).eval(), ["q_proj", "v_proj"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "exporter", "saved"),
    [
        ("bert", "torchscript", None),
        ("bert", "dynamo", None),
        ("llama", "dynamo", None),
        ("bert", "dynamo", ["word_embeddings", "LayerNorm"]),
    ],
)
def test_sequence_classification_matches_peft(
    tmp_path: Path, arch: str, exporter: str, saved: list[str] | None
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model, targets = _classifier(arch)
    ids = torch.tensor([[3, 5, 7, 9, 11], [4, 6, 8, 10, 12]])
    base = tmp_path / "base.onnx"
    _export(model, (ids,), ["input_ids"], base, exporter == "dynamo")
    config = LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=targets, init_lora_weights=False, modules_to_save=saved
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:  # a trained head, not the base's copy
                parameter.add_(torch.randn_like(parameter))
        expected = peft_model(input_ids=ids).logits.numpy()
        merged_expected = copy.deepcopy(peft_model).merge_and_unload()(input_ids=ids).logits.numpy()
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    feeds = {"input_ids": ids.numpy()}
    assert rel_err(run(base, feeds)[0], expected) > 1e-2  # the head does change the logits
    unmerged = apply_peft(base, folder, output=tmp_path / "u.onnx", validate=True)
    assert unmerged.validation is not None and unmerged.validation.ok and unmerged.peft.saved
    assert rel_err(run(tmp_path / "u.onnx", feeds)[0], expected) <= 1e-4
    apply_peft(base, folder, output=tmp_path / "m.onnx", merge=True, validate=True)
    assert rel_err(run(tmp_path / "m.onnx", feeds)[0], merged_expected) <= 1e-4
    back = export_peft_adapter(tmp_path / "u.onnx", tmp_path / "back")
    original, exported = (
        load_file(folder / "adapter_model.safetensors"),
        load_file(back / "adapter_model.safetensors"),
    )
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[key], exported[key]) for key in original)


@pytest.mark.parametrize(
    ("weight", "chain", "conv1d"),
    [("proj.weight", False, True), ("onnx::MatMul_9", False, False), ("proj.weight", True, False)],
)
def test_a_square_weight_keeps_its_pytorch_layout(
    tmp_path: Path, weight: str, chain: bool, conv1d: bool
) -> None:
    # Shapes cannot tell (out, in) from (in, out): a parameter-named initializer is the parameter as stored
    # (GPT-2's Conv1D keeps (in, out)), an anonymous one a Linear weight the exporter pre-transposed.
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="/enc/q/MatMul")]
    read = weight
    if chain:
        nodes.append(helper.make_node("Transpose", [weight], ["proj_t"], name="/proj/Transpose", perm=[1, 0]))
        read = "proj_t"
    nodes.append(helper.make_node("MatMul", ["h", read], ["y"], name="/proj/MatMul"))
    base = make_model(
        nodes, {"x": (F, ["batch", 8])}, ["y"], {"W": rng_array((8, 6), 5), weight: rng_array((6, 6), 6)}
    )
    saved = rng_array((6, 6), 9)
    folder = _adapter(tmp_path, {"base_model.model.proj.weight": saved}, modules_to_save=["proj"])
    apply_peft(base, folder, output=tmp_path / "o.onnx")
    a, b = LORA["base_model.model.enc.q.lora_A.weight"], LORA["base_model.model.enc.q.lora_B.weight"]
    h = X @ rng_array((8, 6), 5) + SCALE * (X @ a.T) @ b.T
    expected = h @ (saved if conv1d else saved.T)
    assert rel_err(run(tmp_path / "o.onnx", {"x": X})[0], expected) <= 1e-5


def test_a_saved_conv_head(tmp_path: Path) -> None:
    from builders import conv_reference

    nodes = [
        helper.make_node("Conv", ["img", "W1"], ["f"], name="/enc/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["f", "W2", "b2"], ["y"], name="/head/Conv"),
    ]
    inits = {"W1": rng_array((4, 2, 3, 3), 1), "W2": rng_array((3, 4, 1, 1), 2), "b2": rng_array((3,), 3)}
    base = make_model(nodes, {"img": (F, ["batch", 2, 5, 5])}, ["y"], inits)
    tensors = {
        "base_model.model.enc.conv.lora_A.weight": rng_array((2, 2, 3, 3), 4),
        "base_model.model.enc.conv.lora_B.weight": rng_array((4, 2, 1, 1), 5),
        "base_model.model.head.weight": rng_array((3, 4, 1, 1), 6),
        "base_model.model.head.bias": rng_array((3,), 7),
    }
    folder = write_adapter(tmp_path / "a", tensors, modules_to_save=["head"])
    img = rng_array((2, 2, 5, 5), 8)
    a, b = (
        tensors["base_model.model.enc.conv.lora_A.weight"],
        tensors["base_model.model.enc.conv.lora_B.weight"],
    )
    f = conv_reference(img, inits["W1"], pads=[1, 1, 1, 1])
    f = f + SCALE * conv_reference(conv_reference(img, a, pads=[1, 1, 1, 1]), b)
    expected = conv_reference(f, tensors["base_model.model.head.weight"])
    expected = expected + tensors["base_model.model.head.bias"].reshape(1, -1, 1, 1)
    for merge in (False, True):
        apply_peft(base, folder, output=tmp_path / f"{merge}.onnx", merge=merge, validate=True)
        assert rel_err(run(tmp_path / f"{merge}.onnx", {"img": img})[0], expected) <= 1e-5
    wrong = {**tensors, "base_model.model.head.weight": rng_array((3, 4, 3, 3), 6)}
    with pytest.raises(AdapterError, match=r"has shape \[3, 4, 3, 3\].*'/head/Conv'"):
        apply_peft(base, write_adapter(tmp_path / "b", wrong, modules_to_save=["head"]))
