"""Tied / shared weights: a fold unties them (the adapted nodes get their own folded copy, the others keep
the base), so merges and inject --validate proofs work; GPT-2's tied wte / lm_head against PEFT."""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rel_err, rng_array, run
from onnx import TensorProto, helper, numpy_helper

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.cli.main import main
from lora_onnx.model.manifest import read_branches

F = TensorProto.FLOAT
VOCAB, DIM = 32, 6
IDS = np.array([[1, 5, 11], [0, 3, 3]], np.int64)


def _tied(cast: bool = False) -> onnx.ModelProto:
    """GPT-2's tied form: the table feeds the embedding Gather and, through a Transpose, the LM head."""
    table = rng_array((VOCAB, DIM), 1)
    source = "wte"
    nodes = []
    if cast:  # fp16 storage, fp32 compute: both users read through the Cast
        nodes.append(helper.make_node("Cast", ["wte16"], ["wte"], name="/cast", to=F))
    nodes += [
        helper.make_node("Gather", [source, "ids"], ["e"], name="/transformer/wte/Gather"),
        helper.make_node("Relu", ["e"], ["h"], name="/transformer/act/Relu"),
        helper.make_node("Transpose", [source], ["wte_t"], name="/lm_head/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "wte_t"], ["logits"], name="/lm_head/MatMul"),
    ]
    inits = {"wte16": table.astype(np.float16)} if cast else {"wte": table}
    return make_model(nodes, {"ids": (TensorProto.INT64, ["batch", 3])}, ["logits"], inits)


def _lm_head(rank: int = 2, name: str = "default") -> LoraConfig:
    return LoraConfig(rank=rank, init="random", targets=TargetSelector(names=("lm_head",)), adapter_name=name)


@pytest.mark.parametrize("cast", [False, True])
def test_merging_an_adapter_on_a_tied_lm_head_unties_it(tmp_path: Path, cast: bool) -> None:
    base = _tied(cast)
    injected = lora_onnx.inject(base, _lm_head())
    assert len(injected.branches) == 1
    merged = lora_onnx.merge(injected.model, output=tmp_path / "m.onnx", validate=True)
    assert merged.validation is not None and merged.validation.ok
    (note,) = merged.notes
    assert "untied shared weight" in note and "'/transformer/wte/Gather' keeps the base" in note
    proto = onnx.load(tmp_path / "m.onnx")
    nodes = {node.name: node for node in proto.graph.node}
    source = "wte16" if cast else "wte"
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    table = rng_array((VOCAB, DIM), 1)
    assert np.array_equal(stored[source], table.astype(np.float16) if cast else table)  # the base is intact
    assert nodes["/transformer/wte/Gather"].input[0] == "wte"  # still the base (through its Cast when fp16)
    lm_input = nodes["/lm_head/MatMul"].input[1]
    assert lm_input != "wte_t" and "/lm_head/Transpose" not in nodes  # its own copy, its own Transpose
    copy_name = next(name for name in stored if name.endswith(".folded"))
    assert stored[copy_name].dtype == (np.float16 if cast else np.float32)  # the source's layout and type
    tol = 2e-3 if cast else 1e-5
    assert rel_err(run(proto, {"ids": IDS})[0], run(injected.model.proto, {"ids": IDS})[0]) <= tol
    assert rel_err(run(proto, {"ids": IDS})[0], run(base, {"ids": IDS})[0]) > 1e-2
    assert len(proto.graph.node) == len(base.graph.node) + (1 if cast else 0)  # only a copied Cast is new


def test_inject_validate_proves_a_branch_on_a_shared_weight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before, the proof's fold refused ("shared with node ... which has no branch"): it folds into a copy now.
    model = tmp_path / "tied.onnx"
    onnx.save(_tied(), model)
    out = tmp_path / "lora.onnx"
    recipe = ["--target", "lm_head", "--init", "random", "--rank", "2"]
    assert main(["inject", str(model), "-o", str(out), *recipe, "--validate"]) == 0
    result = lora_onnx.inject(model, _lm_head(), validate=True)
    assert result.validation is not None and result.validation.ok
    capsys.readouterr()
    assert main(["merge", str(out), "-o", str(tmp_path / "m.onnx"), "--validate"]) == 0
    assert "note: untied shared weight 'wte'" in capsys.readouterr().out


def test_different_adapters_on_the_sharing_nodes_get_one_copy_each(tmp_path: Path) -> None:
    # Two modules read one initializer (an exporter's deduplication); each carries its own adapter.
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="/a/MatMul"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="/b/MatMul"),
    ]
    base = make_model(nodes, {"x": (F, ["batch", 8])}, ["y"], {"W": rng_array((8, 8), 3)})
    first = lora_onnx.inject(base, LoraConfig(rank=2, init="random", targets=TargetSelector(names=("a",))))
    both = lora_onnx.inject(
        first.model,
        LoraConfig(rank=2, init="random", seed=4, adapter_name="b", targets=TargetSelector(names=("b",))),
    )
    x = {"x": rng_array((2, 8), 5)}
    expected = run(both.model.proto, x)[0]
    # fold one adapter: its node gets a copy; the other adapter's branch stays on the base tensor
    one = lora_onnx.stages.fold.fold_branches(both.model, adapters=["b"])
    (left,) = read_branches(one.model.proto)
    assert left.adapter == "default" and left.weight == "W"
    assert rel_err(run(lora_onnx.save_model(one.model, tmp_path / "one.onnx"), x)[0], expected) <= 1e-5
    # then the rest: the base tensor is folded for the node left reading it
    rest = lora_onnx.merge(tmp_path / "one.onnx", output=tmp_path / "all.onnx", validate=True)
    assert rest.validation is not None and rest.validation.ok
    assert rel_err(run(tmp_path / "all.onnx", x)[0], expected) <= 1e-5
    # both at once: one copy per node, and the base tensor, read by no one, is dropped
    at_once = lora_onnx.merge(both.model, output=tmp_path / "once.onnx")
    assert len(at_once.notes) == 2
    proto = onnx.load(tmp_path / "once.onnx")
    assert "W" not in {t.name for t in proto.graph.initializer}
    assert rel_err(run(proto, x)[0], expected) <= 1e-5


def test_a_kept_branch_follows_its_node_to_the_untied_copy(tmp_path: Path) -> None:
    # Two adapters on the tied lm_head: folding one moves the node to a copy; the other's record follows,
    # so folding it later changes that copy, not the embedding's table.
    base = _tied()
    first = lora_onnx.inject(base, _lm_head(name="a"))
    both = lora_onnx.inject(
        first.model,
        LoraConfig(
            rank=2, init="random", seed=7, adapter_name="b", targets=TargetSelector(names=("lm_head",))
        ),
    )
    expected = run(both.model.proto, {"ids": IDS})[0]
    one = lora_onnx.stages.fold.fold_branches(both.model, adapters=["a"])
    (left,) = read_branches(one.model.proto)
    assert left.adapter == "b" and left.weight.endswith(".folded")
    lora_onnx.save_model(one.model, tmp_path / "one.onnx")
    merged = lora_onnx.merge(tmp_path / "one.onnx", output=tmp_path / "m.onnx", validate=True)
    assert merged.validation is not None and merged.validation.ok and not merged.notes
    proto = onnx.load(tmp_path / "m.onnx")
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert np.array_equal(stored["wte"], rng_array((VOCAB, DIM), 1))
    assert rel_err(run(proto, {"ids": IDS})[0], expected) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# GPT-2 against PEFT (torch)


def _gpt2_export(path: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, use_cache=False,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    forward = model.forward
    model.forward = lambda input_ids, attention_mask: (
        forward(input_ids=input_ids, attention_mask=attention_mask).logits
    )
    # dynamo with optimize=False keeps the tied table once, a Transpose feeding lm_head (as Optimum stores it)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
            output_names=["logits"], dynamo=True, optimize=False,
        )  # fmt: skip
    del model.forward
    return model, ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "c_attn"], ["wte"]])
def test_gpt2_tied_lm_head_merges_as_the_unmerged_peft_model(tmp_path: Path, targets: list[str]) -> None:
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = tmp_path / "gpt2.onnx"
    model, ids, mask = _gpt2_export(base)
    graph = onnx.load(base, load_external_data=False).graph
    tied = [node for node in graph.node if "lm_head.weight" in node.input]
    assert {node.op_type for node in tied} == {"Gather", "Transpose"}  # one table, two users
    peft_model = get_peft_model(
        copy.deepcopy(model), PeftLoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    )
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits.numpy()
        peft_merged = (
            copy.deepcopy(peft_model).merge_and_unload()(input_ids=ids, attention_mask=mask).logits.numpy()
        )
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    unmerged = lora_onnx.apply_peft(base, folder, output=tmp_path / "u.onnx", validate=True)
    assert unmerged.validation is not None and unmerged.validation.ok and not unmerged.notes  # proven whole
    assert rel_err(run(tmp_path / "u.onnx", feeds)[0], expected) <= 1e-4
    merged = lora_onnx.apply_peft(base, folder, output=tmp_path / "m.onnx", merge=True, validate=True)
    assert merged.validation is not None and merged.validation.ok
    assert any("untied shared weight 'lm_head.weight'" in note for note in merged.fold_notes)
    assert rel_err(run(tmp_path / "m.onnx", feeds)[0], expected) <= 1e-4
    # PEFT's merge_and_unload writes the delta into the shared parameter, changing the other user too (it
    # warns): its merged model is not its unmerged one. The untied merge equals the unmerged model.
    assert rel_err(peft_merged, expected) > 1e-2


def test_inject_peft_merge_notes_the_untie(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from builders import write_adapter

    model = tmp_path / "tied.onnx"
    onnx.save(_tied(), model)
    tensors = {
        "base_model.model.lm_head.lora_A.weight": rng_array((2, DIM), 8),
        "base_model.model.lm_head.lora_B.weight": rng_array((VOCAB, 2), 9),
    }
    folder = write_adapter(tmp_path / "adapter", tensors, target_modules=["lm_head"])
    out = tmp_path / "m.onnx"
    assert main(["inject", str(model), "--peft", str(folder), "--merge", "--validate", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "note: untied shared weight 'wte'" in captured.out and "warning" not in captured.err.lower()
    a, b = tensors.values()
    h = np.maximum(rng_array((VOCAB, DIM), 1)[IDS], 0)
    expected = h @ rng_array((VOCAB, DIM), 1).T + 2.0 * (h @ a.T) @ b.T  # write_adapter: alpha 4, r 2
    assert rel_err(run(out, {"ids": IDS})[0], expected) <= 1e-5
