"""Slots made by other tools (no lora-onnx manifest): onnxruntime's LoRA test model and Olive's adapters.

The models are rebuilt as those tools make them: onnxruntime's ``two_params_lora_model`` with
onnx.helper as its generator script does (unnamed nodes, one shared ``dim`` rank), and an Olive model
from a real TorchScript export of a PEFT model, its LoRA weights then turned into inputs the way
Olive's ``ExtractAdapters`` pass does (initializers renamed from the MatMul node names, rank dim
``lora_r``, empty defaults). Folds are checked in onnxruntime against the slotted model run with the
adapter file active through ``ort.LoraAdapter``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lora_onnx
from lora_onnx.adapters.files import write_adapter_file
from lora_onnx.errors import AdapterError
from lora_onnx.model.load import load_model
from lora_onnx.stages.foreign_slots import FOREIGN_ADAPTER, foreign_slot_records
from tests.builders import MODELS, rel_err, rng_array
from tests.swap_builders import load_adapter, run_with, session


def ort_two_params_model() -> onnx.ModelProto:
    """onnxruntime/test/testdata/lora/two_params_lora_model.onnx, built as its script builds it."""
    weight = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input_x", "weight_x"], ["mm_output_x"]),
            helper.make_node("MatMul", ["input_x", "lora_param_a"], ["mm_output_a"]),
            helper.make_node("MatMul", ["mm_output_a", "lora_param_b"], ["mm_output_b"]),
            helper.make_node("Add", ["mm_output_x", "mm_output_b"], ["output"]),
        ],
        "two_params_lora_model",
        [
            helper.make_tensor_value_info("input_x", TensorProto.FLOAT, [4, 4]),
            helper.make_tensor_value_info("lora_param_a", TensorProto.FLOAT, [4, "dim"]),
            helper.make_tensor_value_info("lora_param_b", TensorProto.FLOAT, ["dim", 4]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4, 4])],
        [
            helper.make_tensor("weight_x", TensorProto.FLOAT, [4, 4], weight.flatten()),
            helper.make_tensor("lora_param_a", TensorProto.FLOAT, [4, 0], []),
            helper.make_tensor("lora_param_b", TensorProto.FLOAT, [0, 4], []),
        ],
    )
    return helper.make_model(graph)


ORT_ADAPTER = {
    "lora_param_a": np.array([3, 4, 5, 6], np.float32).reshape(4, 1),
    "lora_param_b": np.array([7, 8, 9, 10], np.float32).reshape(1, 4),
}

# Olive's ExtractAdapters: MatMuls named like this are LoRA modules (LORA_NAME_PATTERNS_TORCHSCRIPT) ...
_OLIVE_PATTERNS = [
    rf".*[./]{name}[./]MatMul$"
    for name in ("default_0", "default_0_1", "default", "default_1", "lora_A", "lora_B")
]


def _olive_weight_name(node_name: str) -> str:
    """... and their weight is renamed from the node name (ExtractAdapters._create_new_weight_name)."""
    name = node_name.removeprefix("/")
    op = name.split("/")[-1]
    name = name.replace("/", ".")
    for old, new in (("default.", "lora_A."), ("default_1.", "lora_B."), ("default_0.", "lora_A."),
                     ("default_0_1.", "lora_B.")):  # fmt: skip
        name = name.replace(old, new)
    return name.replace(op, "weight")


def olive_style(exported: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The PEFT export with its LoRA weights made inputs as Olive does: renamed, rank dim ``lora_r``
    (A's dim 1, B's dim 0), an empty default initializer each. Returns the model and the weights."""
    model = onnx.ModelProto()
    model.CopyFrom(exported)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    weights: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or not any(re.match(p, node.name) for p in _OLIVE_PATTERNS):
            continue
        old = node.input[1]
        new = _olive_weight_name(node.name)
        weights[new] = numpy_helper.to_array(initializers[old])
        node.input[1] = new
        axis = 1 if "lora_A" in new else 0
        shape = list(weights[new].shape)
        dims: list[int | str] = list(shape)
        dims[axis], shape[axis] = "lora_r", 0
        graph.initializer.remove(initializers[old])
        graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), new))
        graph.input.append(helper.make_tensor_value_info(new, TensorProto.FLOAT, dims))
    return model, weights


@pytest.fixture(scope="module")
def olive_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], object]:
    """An Olive-style model of a tiny PEFT MLP (biased and unbiased Linear, scale 2), its adapter and the
    PEFT model (for a PyTorch reference)."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16)
            self.fc2 = torch.nn.Linear(16, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    peft_model = get_peft_model(Net(), config).eval()
    folder = tmp_path_factory.mktemp("olive")
    exported = folder / "exported.onnx"
    torch.onnx.export(
        peft_model, (torch.randn(2, 3, 8),), str(exported), dynamo=False, input_names=["x"],
        output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}},
    )  # fmt: skip
    model, weights = olive_style(onnx.load(str(exported)))
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path, weights, peft_model


def test_ort_test_model_slot_is_recognised() -> None:
    records = foreign_slot_records(load_model(ort_two_params_model()))
    assert len(records) == 1
    (record,) = records
    assert (record.a, record.b, record.weight, record.kind) == (
        "lora_param_a",
        "lora_param_b",
        "weight_x",
        "dense",
    )
    assert (record.adapter, record.scale, record.join, record.base_join) == (
        FOREIGN_ADAPTER,
        1.0,
        "output",
        "mm_output_x",
    )


def test_ort_test_model_checks_and_folds(tmp_path: Path) -> None:
    model_path = tmp_path / "two_params_lora_model.onnx"
    onnx.save(ort_two_params_model(), str(model_path))
    adapter = write_adapter_file(ORT_ADAPTER, tmp_path / "two_params_lora_model.onnx_adapter")
    check = lora_onnx.check_adapter(model_path, adapter)
    assert check.ok and {row.name for row in check.rows} == set(ORT_ADAPTER)
    x = rng_array((4, 4), 3)
    expected = run_with(session(model_path), {"input_x": x}, load_adapter(adapter))[0]
    # onnxruntime's own expectation: x @ W + (x @ A) @ B
    weight = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(
        expected, x @ weight + x @ ORT_ADAPTER["lora_param_a"] @ ORT_ADAPTER["lora_param_b"], rtol=1e-5
    )
    result = lora_onnx.merge(model_path, output=tmp_path / "merged.onnx", adapter_file=adapter, validate=True)
    assert result.validation is not None and result.validation.ok
    merged = onnx.load(str(tmp_path / "merged.onnx"))
    assert {v.name for v in merged.graph.input} == {"input_x"}
    assert sorted(n.op_type for n in merged.graph.node) == ["MatMul"]
    assert rel_err(session(tmp_path / "merged.onnx").run(None, {"input_x": x})[0], expected) <= 1e-6


def test_ort_test_model_misfit_file_is_reported(tmp_path: Path) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(ort_two_params_model(), str(model_path))
    bad = write_adapter_file(
        {"lora_param_a": np.ones((4, 2), np.float32), "lora_param_b": np.ones((3, 4), np.float32)},
        tmp_path / "bad.onnx_adapter",
    )
    check = lora_onnx.check_adapter(model_path, bad)
    assert not check.ok and [row.status for row in check.problems] == ["rank"]


@pytest.mark.slow
def test_olive_model_slots_are_recognised(olive_case: tuple) -> None:
    path, weights, _ = olive_case
    records = {r.module_path: r for r in foreign_slot_records(load_model(path))}
    assert set(records) == {"model.fc1", "model.fc2"}
    for module, record in records.items():
        assert record.a == f"{module}.lora_A.weight" and record.b == f"{module}.lora_B.weight"
        assert record.scale == pytest.approx(2.0)  # lora_alpha / r, PEFT's scaling Mul
        assert record.site == f"/{module.replace('.', '/')}/base_layer/MatMul"
    assert set(weights) == {name for r in records.values() for name in (r.a, r.b)}


@pytest.mark.slow
def test_olive_model_folds_equal_the_adapter_active_and_peft(olive_case: tuple, tmp_path: Path) -> None:
    import torch

    path, weights, peft_model = olive_case
    adapter = write_adapter_file(weights, tmp_path / "olive.onnx_adapter")
    assert lora_onnx.check_adapter(path, adapter).ok
    x = rng_array((2, 5, 8), 7)
    active = run_with(session(path), {"x": x}, load_adapter(adapter))[0]
    base = run_with(session(path), {"x": x})[0]
    with torch.no_grad():
        reference = peft_model(torch.from_numpy(x)).numpy()
    assert rel_err(active, reference) <= 1e-5 and rel_err(base, reference) > 1e-2
    out = tmp_path / "merged.onnx"
    result = lora_onnx.merge(path, output=out, adapter_file=adapter, validate=True)
    assert result.validation is not None and result.validation.ok
    assert {b.module_path for b in result.folded} == {"model.fc1", "model.fc2"}
    merged = onnx.load(str(out))
    assert [v.name for v in merged.graph.input] == ["x"]
    assert not any("default" in n.name for n in merged.graph.node)
    assert rel_err(session(out).run(None, {"x": x})[0], active) <= 1e-5
    # at strength 0.5 the fold equals the slotted model run with half of each B
    half = {k: (v * 0.5 if ".lora_B." in k else v) for k, v in weights.items()}
    half_file = write_adapter_file(half, tmp_path / "half.onnx_adapter")
    halved = run_with(session(path), {"x": x}, load_adapter(half_file))[0]
    lora_onnx.merge(path, output=tmp_path / "half.onnx", adapter_file=adapter, strength=0.5)
    assert rel_err(session(tmp_path / "half.onnx").run(None, {"x": x})[0], halved) <= 1e-5


@pytest.mark.slow
def test_olive_model_partial_file_removes_the_other_slot(olive_case: tuple, tmp_path: Path) -> None:
    path, weights, _ = olive_case
    only_fc1 = {k: v for k, v in weights.items() if k.startswith("model.fc1.")}
    adapter = write_adapter_file(only_fc1, tmp_path / "fc1.onnx_adapter")
    assert [r.status for r in lora_onnx.check_adapter(path, adapter).problems] == ["missing", "missing"]
    assert lora_onnx.check_adapter(path, adapter, partial=True).ok
    out = tmp_path / "merged.onnx"
    result = lora_onnx.merge(path, output=out, adapter_file=adapter, validate=True)
    assert [b.module_path for b in result.folded] == ["model.fc1"]
    assert {b.module_path for b in result.slots_removed} == {"model.fc2"}
    assert [v.name for v in onnx.load(str(out)).graph.input] == ["x"]


def test_chain_read_elsewhere_is_not_a_slot(tmp_path: Path) -> None:
    # B's output is also a graph output: removing the chain would change it, so it is not taken
    model = ort_two_params_model()
    model.graph.output.append(helper.make_tensor_value_info("mm_output_b", TensorProto.FLOAT, [4, 4]))
    assert foreign_slot_records(load_model(model)) == ()
    # so is a chain whose base output is read elsewhere too (removing the slot renames it)
    other = ort_two_params_model()
    other.graph.output.append(helper.make_tensor_value_info("mm_output_x", TensorProto.FLOAT, [4, 4]))
    assert foreign_slot_records(load_model(other)) == ()
    assert len(foreign_slot_records(load_model(ort_two_params_model()))) == 1
    adapter = write_adapter_file(ORT_ADAPTER, tmp_path / "a.onnx_adapter")
    with pytest.raises(AdapterError, match="has no LoRA slots"):
        lora_onnx.check_adapter(model, adapter)


@pytest.mark.slow
def test_cli_check_and_merge(tmp_path: Path) -> None:
    model_path = tmp_path / "two.onnx"
    onnx.save(ort_two_params_model(), str(model_path))
    adapter = write_adapter_file(ORT_ADAPTER, tmp_path / "two.onnx_adapter")
    cli = [sys.executable, "-m", "lora_onnx"]
    checked = subprocess.run(
        [*cli, "check-adapter", str(model_path), str(adapter)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    out = tmp_path / "m.onnx"
    command = [*cli, "merge", str(model_path), "--adapter-file", str(adapter), "-o", str(out), "--validate"]
    merged = subprocess.run(command, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert out.exists()


@pytest.mark.slow
def test_genai_builder_model_with_olive_extracted_slots(tmp_path: Path) -> None:
    """onnxruntime-genai's builder with ``adapter_path=`` builds constant LoRA MatMuls (``.../q_proj/lora_A/
    MatMul``, A^T and s * B^T); Olive's ExtractAdapters makes them inputs. The fold equals the model with the
    file active. (The builder's tiny-Llama base itself differs from transformers' forward here, so PEFT's
    logits are no reference; its tensors are.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(str(tmp_path / "hf"))
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2"
    )
    tokenizer.save_pretrained(str(tmp_path / "hf"))  # the builder loads one
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora).eval()
    peft_model.save_pretrained(str(tmp_path / "lora"))
    built = tmp_path / "built"
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "tiny", "-i", str(tmp_path / "hf"),
        "-o", str(built), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache"),
        "--extra_options", f"adapter_path={tmp_path / 'lora'}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model, weights = olive_style(onnx.load(str(built / "model.onnx")))
    assert "model.layers.0.attn.q_proj.lora_A.weight" in weights  # the builder's naming, Olive's renaming
    path = tmp_path / "slots.onnx"
    onnx.save(model, str(path))
    records = foreign_slot_records(load_model(path))
    assert {r.module_path for r in records} == {
        f"model.layers.{n}.attn.{p}_proj" for n in range(2) for p in ("q", "v")
    }
    adapter = write_adapter_file(weights, tmp_path / "tiny.onnx_adapter")
    assert lora_onnx.check_adapter(path, adapter).ok
    ids = np.array([[5, 9, 17, 3, 44]], np.int64)
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for n in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{n}.{kind}"] = np.zeros((1, 2, 0, 16), np.float32)
    state = {k: v.detach().numpy() for k, v in peft_model.state_dict().items() if ".lora_" in k}
    for n in range(2):
        peft_a = state[f"base_model.model.model.layers.{n}.self_attn.q_proj.lora_A.default.weight"]
        peft_b = state[f"base_model.model.model.layers.{n}.self_attn.q_proj.lora_B.default.weight"]
        assert np.allclose(weights[f"model.layers.{n}.attn.q_proj.lora_A.weight"], peft_a.T)
        assert np.allclose(weights[f"model.layers.{n}.attn.q_proj.lora_B.weight"], 2.0 * peft_b.T)
    active = run_with(session(path), feeds, load_adapter(adapter))[0]
    assert rel_err(run_with(session(path), feeds)[0], active) > 1e-2  # the adapter changes the logits
    out = tmp_path / "merged.onnx"
    lora_onnx.merge(path, output=out, adapter_file=adapter)
    merged = onnx.load(str(out))
    assert not any(v.name.endswith(".lora_A.weight") for v in merged.graph.input)
    assert rel_err(session(out).run(None, feeds)[0], active) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnet", "tiny_gpt2"])
def test_lora_onnx_slots_without_their_manifest(name: str, tmp_path: Path) -> None:
    """lora-onnx's own slots (conv with groups, Gemm, MatMul) with the manifest stripped, as another tool
    would leave them: the graph alone gives the same records, and the fold the same model."""
    from lora_onnx import LoraConfig
    from lora_onnx.model.manifest import MANIFEST_KEY, read_branches

    slotted, adapter = tmp_path / "slots.onnx", tmp_path / "a.onnx_adapter"
    lora_onnx.inject_slots(
        MODELS / name / "model.onnx", LoraConfig(rank=4, init="random", seed=3), output=slotted,
        adapter_output=adapter,
    )  # fmt: skip
    proto = onnx.load(str(slotted))
    own = read_branches(proto)
    kinds = {b.kind for b in own}
    assert kinds == ({"conv", "dense"} if name == "convnet" else {"dense"})
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    kept = [entry for entry in bare.metadata_props if entry.key != MANIFEST_KEY]
    del bare.metadata_props[:]
    bare.metadata_props.extend(kept)
    stripped = tmp_path / "stripped.onnx"
    onnx.save(bare, str(stripped))
    found = {r.site: r for r in foreign_slot_records(load_model(stripped))}
    fields = ("kind", "a", "b", "weight", "source_layout", "join", "base_join", "a_group", "b_group", "scale")
    assert set(found) == {b.site for b in own}
    for record in own:
        assert [getattr(found[record.site], f) for f in fields] == [getattr(record, f) for f in fields]
        assert set(found[record.site].nodes) == set(record.nodes)
    assert lora_onnx.check_adapter(stripped, adapter).ok
    theirs = lora_onnx.merge(stripped, output=tmp_path / "theirs.onnx", adapter_file=adapter, validate=True)
    ours = lora_onnx.merge(slotted, output=tmp_path / "ours.onnx", adapter_file=adapter)
    assert theirs.validation is not None and theirs.validation.ok
    assert len(theirs.folded) == len(ours.folded) == len(own)
    mine, other = _initializers(tmp_path / "ours.onnx"), _initializers(tmp_path / "theirs.onnx")
    assert set(mine) == set(other) and all(np.array_equal(mine[k], other[k]) for k in mine)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
