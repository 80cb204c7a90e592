"""PEFT adapters on a BERT that onnxruntime's transformer optimizer fused (q/k/v in com.microsoft.Attention).

A tiny random BertModel (hidden 32, 2 heads, 2 layers, eager attention: the pattern the fusion knows) is
exported with TorchScript and optimized with ``onnxruntime.transformers.optimizer.optimize_model`` as
Optimum's ``--optimize O2`` does; PEFT adapters with non-zero B are applied to it and compared with PEFT's
own PyTorch outputs (rel <= 1e-4, fp32).
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lora_onnx import apply_peft
from lora_onnx.adapters.peft.fused_attention import find_fused_attention, fold_fused, fused_reference
from lora_onnx.adapters.peft.planning import PEFT_OPS, plan_peft_adapter
from lora_onnx.errors import AdapterError
from lora_onnx.model.load import load_model
from lora_onnx.proofs.validation import validate
from lora_onnx.sites.find import scan_sites
from tests.builders import rel_err, run

pytestmark = pytest.mark.slow
HIDDEN, HEADS, LAYERS, SEQ = 32, 2, 2, 6


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The optimized export, its feeds, and the PyTorch model it came from."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # random biases and norms too: nothing the export may share
            parameter.add_(torch.randn_like(parameter) * 0.1)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.m = inner

        def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    folder = tmp_path_factory.mktemp("bert")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(0, 64, (1, SEQ))
    args = (ids, torch.ones(1, SEQ, dtype=torch.int64), torch.zeros(1, SEQ, dtype=torch.int64))
    exported = folder / "model.onnx"
    torch.onnx.export(
        Wrapper(model).eval(), args, str(exported), dynamo=False, input_names=names,
        output_names=["last_hidden_state"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
        opset_version=17,
    )  # fmt: skip
    optimized = optimize_model(
        str(exported), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=0, use_gpu=False
    )
    path = folder / "optimized.onnx"
    optimized.save_model_to_file(str(path))
    feeds = {
        "input_ids": np.array([[3, 17, 9, 41, 2, 60]], np.int64),
        "attention_mask": np.ones((1, SEQ), np.int64),
        "token_type_ids": np.array([[0, 0, 0, 1, 1, 1]], np.int64),
    }
    return {"path": path, "feeds": feeds, "model": model, "folder": folder}


def _torch_output(model: object, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    inputs = {name: torch.from_numpy(value) for name, value in feeds.items()}
    with torch.no_grad():
        return model(**inputs).last_hidden_state.numpy()  # type: ignore[operator]


def _adapter(bert: dict, name: str, targets: list[str], seed: int) -> tuple[Path, object]:
    """A PEFT adapter on ``targets`` with random A and B, saved; and the PEFT model it was saved from."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(bert["model"]), config).eval()
    with torch.no_grad():
        for key, parameter in peft_model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(0, 0.3)
    folder = bert["folder"] / name
    peft_model.save_pretrained(str(folder))
    return folder, peft_model


def test_the_optimizer_fuses_qkv(bert: dict) -> None:
    model = onnx.load(str(bert["path"]))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Attention") == LAYERS and "SkipLayerNormalization" in ops
    assert not any("query" in node.name or "value" in node.name for node in model.graph.node)
    loaded = load_model(bert["path"])
    fused = find_fused_attention(loaded, scan_sites(loaded, PEFT_OPS))
    assert [f.node for f in fused] == ["Attention_0", "Attention_1"]
    assert all(f.columns == ((0, 32), (32, 64), (64, 96)) for f in fused)
    # the base export equals PyTorch, so the comparisons below test the adapter alone
    assert rel_err(run(bert["path"], bert["feeds"])[0], _torch_output(bert["model"], bert["feeds"])) <= 1e-4


def test_merge_folds_query_value_into_the_packed_weight(bert: dict, tmp_path: Path) -> None:
    folder, peft_model = _adapter(bert, "qv", ["query", "value"], seed=1)
    reference = _torch_output(peft_model.merge_and_unload(), bert["feeds"])
    base = _torch_output(bert["model"], bert["feeds"])
    out = tmp_path / "merged.onnx"
    result = apply_peft(bert["path"], folder, output=out, merge=True, validate=True)
    merged = run(out, bert["feeds"])[0]
    assert rel_err(merged, reference) <= 1e-4 and rel_err(base, reference) > 1e-2
    assert any("Attention_0" in note and "columns 0:32 (query)" in note for note in result.notes)
    assert result.validation is not None and result.validation.ok  # vs the weight computed in the graph
    # the key block of each packed weight is untouched; the query and value blocks changed
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(bert["path"])).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for layer in range(LAYERS):
        name = f"Attention_{layer}_qkv_weight"
        assert np.array_equal(before[name][:, 32:64], after[name][:, 32:64])
        assert not np.allclose(before[name][:, :32], after[name][:, :32])
        assert not np.allclose(before[name][:, 64:], after[name][:, 64:])
    assert sum(node.op_type == "Attention" for node in onnx.load(str(out)).graph.node) == LAYERS


def test_the_proof_catches_a_wrong_fold(bert: dict) -> None:
    folder, _ = _adapter(bert, "qv_proof", ["query", "value"], seed=7)
    model = load_model(bert["path"])
    deltas = plan_peft_adapter(model, folder, fused_merge=True).fused
    assert len(deltas) == 2 * LAYERS
    folded = fold_fused(model, deltas)
    assert validate(fused_reference(model, deltas), folded).ok
    # the value block folded into the key columns: the reference disagrees
    shifted = [dataclasses.replace(d, part=1) if d.part == 2 else d for d in deltas]
    assert not validate(fused_reference(model, shifted), folded).ok


def test_unmerged_is_refused_naming_the_fusion(bert: dict, tmp_path: Path) -> None:
    folder, _ = _adapter(bert, "qv_refused", ["query", "value"], seed=2)
    with pytest.raises(AdapterError) as caught:
        apply_peft(bert["path"], folder, output=tmp_path / "out.onnx")
    message = str(caught.value)
    assert "com.microsoft.Attention node 'Attention_0'" in message and "matches no module" not in message
    assert "apply the adapter before optimizing" in message and "--merge" in message
    assert not (tmp_path / "out.onnx").exists()
    # the CLI: one line, exit 2; slots (--as-inputs) take the same refusal
    cli = [sys.executable, "-m", "lora_onnx", "inject", str(bert["path"]), "--peft", str(folder)]
    for extra in ([], ["--as-inputs"]):
        done = subprocess.run([*cli, *extra, "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lora-onnx: error: ") and "Attention_0" in lines[0]


def test_dense_sites_around_fused_ops_apply_unmerged(bert: dict, tmp_path: Path) -> None:
    # intermediate.dense feeds BiasGelu, output.dense a SkipLayerNormalization: still plain sites
    folder, peft_model = _adapter(bert, "dense", ["intermediate.dense", "output.dense"], seed=3)
    reference = _torch_output(peft_model, bert["feeds"])
    out = tmp_path / "dense.onnx"
    result = apply_peft(bert["path"], folder, output=out, validate=True)
    assert result.validation is not None and result.validation.ok
    assert len(result.branches) == 3 * LAYERS  # intermediate.dense, output.dense, attention.output.dense
    assert rel_err(run(out, bert["feeds"])[0], reference) <= 1e-4


def test_fused_and_plain_sites_merge_together(bert: dict, tmp_path: Path) -> None:
    folder, peft_model = _adapter(bert, "all", ["query", "key", "value", "intermediate.dense"], seed=4)
    reference = _torch_output(peft_model.merge_and_unload(), bert["feeds"])
    out = tmp_path / "all.onnx"
    result = apply_peft(bert["path"], folder, output=out, merge=True, validate=True)
    assert result.validation is not None and result.validation.ok
    assert len(result.folded) == LAYERS and len(result.peft.fused) == 3 * LAYERS
    assert rel_err(run(out, bert["feeds"])[0], reference) <= 1e-4


def test_layer_order_when_no_module_path_is_left(bert: dict, tmp_path: Path) -> None:
    # Nodes renamed anonymously: the n-th Attention node is layer n, and the merge is the same
    model = onnx.load(str(bert["path"]))
    for number, node in enumerate(model.graph.node):
        node.name = f"node_{number}"
    anonymous = tmp_path / "anonymous.onnx"
    onnx.save(model, str(anonymous))
    folder, peft_model = _adapter(bert, "qv_anonymous", ["query", "value"], seed=5)
    reference = _torch_output(peft_model.merge_and_unload(), bert["feeds"])
    apply_peft(anonymous, folder, output=tmp_path / "merged.onnx", merge=True)
    assert rel_err(run(tmp_path / "merged.onnx", bert["feeds"])[0], reference) <= 1e-4


def test_a_layer_the_graph_lacks_is_an_error(bert: dict, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(6)
    deeper = get_peft_model(
        BertModel(config), LoraConfig(r=4, target_modules=["query"], layers_to_transform=[2])
    )
    deeper.save_pretrained(str(tmp_path / "deeper"))
    with pytest.raises(AdapterError, match=r"names layer 2, but no fused Attention node"):
        apply_peft(bert["path"], tmp_path / "deeper", merge=True)
