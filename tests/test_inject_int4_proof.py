"""``inject --peft --validate`` (and ``inject --validate`` for recipes, ``batch --peft --validate``) on an
int4 model (onnxruntime-genai's builder with ``-p int4``: MatMulNBits) proves its branches (issue 14).

The reference is the injected model's branches folded into the dequantized base (what ``merge --dequantize``
writes); onnxruntime's int4 kernels (int8 activations) differ from float by their own rounding, measured on
the base (B = 0 against its dequantized fold) and allowed (``lora_onnx.proofs.quantized.dequantized_rtol``).
The proof must fail for a wrong branch: the graph's branch reads a corrupted B while its record (what the fold
folds) names the right one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from batch_helpers import cli, files_under
from builders import rel_err
from decoder_builders import genai_export, generated_feeds, onnx_logits, peft_adapter, tiny_llama
from onnx import numpy_helper

import lora_onnx.commands.apply_peft as apply_peft_module
import lora_onnx.commands.inject as inject_module
from lora_onnx import apply_peft, inject, merge
from lora_onnx.cli.main import main
from lora_onnx.commands.reports import read_report
from lora_onnx.model.manifest import read_branches
from lora_onnx.proofs.quantized import dequantized_rtol
from lora_onnx.recipes.config import LoraConfig

pytestmark = pytest.mark.slow

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def int4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int4")
    model_dir = tiny_llama(root / "hf")
    model = genai_export(model_dir, root / "int4", precision="int4")
    ops = {node.op_type for node in onnx.load(model, load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops - {"MatMulNBits"}
    return {"model": model, "adapter": peft_adapter(model_dir, root / "adapter", TARGETS, seed=3)}


def _corrupt_b(stage_result, factor: float = -1.0):  # type: ignore[no-untyped-def]
    """``stage_result`` (an insert stage's) with the packed qkv branch's graph reading ``factor`` * B under
    another name, its record still naming the right B: a branch that computes something its record does
    not say."""
    model = stage_result.model
    record = next(r for r in stage_result.records if r.module_path.endswith("qkv_proj"))
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    bad = f"{record.b}.corrupt"
    proto.graph.initializer.append(numpy_helper.from_array(factor * model.array(record.b), bad))
    readers = 0
    for node in proto.graph.node:
        if record.b in node.input:
            node.input[:] = [bad if name == record.b else name for name in node.input]
            readers += 1
    assert readers == 1
    return dataclasses.replace(stage_result, model=model.with_proto(proto))


def test_inject_peft_validate_proves_matmulnbits_branches(int4: dict, tmp_path: Path) -> None:
    out = tmp_path / "lora" / "model.onnx"
    result = apply_peft(int4["model"], int4["adapter"], validate=True, output=out)
    assert {(b.op, b.module_path) for b in result.branches} == {
        ("MatMulNBits", "model.layers.0.attn.qkv_proj"), ("MatMulNBits", "model.layers.0.attn.o_proj"),
    }  # fmt: skip
    assert not any("cannot be folded" in w for w in result.warnings), "a proof, not a note"
    report = result.validation
    assert report is not None and report.ok and out.is_file()
    by_name = {c.name: c for c in report.comparisons}
    # the tolerance is the int4 kernels' measured rounding, not the float default ...
    assert by_name["logits"].rtol == pytest.approx(dequantized_rtol(result.model)["logits"])
    assert 1e-4 < by_name["logits"].rtol < 0.1
    # ... and far below what the adapter changes: a missing or wrong branch cannot hide in it
    feeds = generated_feeds(int4["model"])
    change = rel_err(onnx_logits(out, feeds), onnx_logits(int4["model"], feeds))
    assert change > 10 * by_name["logits"].rtol
    # the reference is merge --dequantize's model: the injected model equals it within the same bound
    merged = merge(out, dequantize=True, output=tmp_path / "merged" / "model.onnx")
    assert not read_branches(merged.model.proto)
    gap = rel_err(onnx_logits(out, feeds), onnx_logits(tmp_path / "merged" / "model.onnx", feeds))
    assert gap <= by_name["logits"].rtol


def test_the_proof_fails_for_a_wrong_branch(
    int4: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = apply_peft_module.insert_peft_branches
    monkeypatch.setattr(apply_peft_module, "insert_peft_branches", lambda m, p: _corrupt_b(real(m, p)))
    out = tmp_path / "bad" / "model.onnx"
    result = apply_peft(int4["model"], int4["adapter"], validate=True, output=out)
    report = result.validation
    assert report is not None and not report.ok and not out.exists(), "nothing written"
    failed = {c.name: c for c in report.failures}
    assert "logits" in failed and failed["logits"].max_rel > 2 * failed["logits"].rtol
    # on the command line: the table with the errors, exit code 1 (a proof that disagrees)
    code = main(["inject", str(int4["model"]), "--peft", str(int4["adapter"]), "--validate", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and not out.exists()
    assert "Proof in onnxruntime (vs its own fold)" in captured.out and "logits" in captured.out
    assert "cannot be folded" not in captured.err
    # the same adapter, branch intact: the proof passes (the test above), here on the command line too
    monkeypatch.setattr(apply_peft_module, "insert_peft_branches", real)
    code = main(["inject", str(int4["model"]), "--peft", str(int4["adapter"]), "--validate", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and out.is_file() and "all outputs agree" in captured.out
    assert "cannot be folded" not in captured.err


def test_recipe_inject_validate_proves_matmulnbits_branches(
    int4: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LoraConfig(rank=4, init="random", seed=2)
    result = inject(int4["model"], config, validate=True)
    assert result.branches and all(b.op == "MatMulNBits" for b in result.branches)
    assert result.validation is not None and result.validation.ok
    assert {c.name: c.rtol for c in result.validation.comparisons}["logits"] > 1e-4  # measured, as above
    zero = inject(int4["model"], LoraConfig(rank=4), validate=True)  # B = 0: outputs unchanged, exactly
    assert zero.validation is not None and zero.validation.ok
    assert all(c.max_abs == 0.0 for c in zero.validation.comparisons)

    real = inject_module.insert_branches

    def corrupted(source, plans, values, zero_init):  # type: ignore[no-untyped-def]
        return _corrupt_b(real(source, plans, values, zero_init=zero_init), factor=-3.0)

    monkeypatch.setattr(inject_module, "insert_branches", corrupted)
    out = tmp_path / "bad.onnx"
    bad = inject(int4["model"], config, validate=True, output=out)
    assert bad.validation is not None and not bad.validation.ok and not out.exists()


def test_batch_peft_validate_proves_the_int4_folder(int4: dict, tmp_path: Path) -> None:
    """The genai folder (model.onnx + its data + genai_config.json + tokenizer) as one batch unit."""
    folder = int4["model"].parent
    done = cli("batch", folder, "-o", tmp_path / "out", "--peft", int4["adapter"], "--validate",
               "--report", tmp_path / "r.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (model,) = read_report(tmp_path / "r.json").models
    assert model.status == "ok" and model.folder == "." and model.sites == 2
    assert model.validation is not None and model.validation["ok"]
    assert not any("cannot be folded" in w for w in model.warnings)
    assert {"genai_config.json", "model.onnx", "model.onnx.data"} <= set(files_under(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert config == json.loads((folder / "genai_config.json").read_text())
    feeds = generated_feeds(int4["model"])
    assert np.array_equal(
        onnx_logits(tmp_path / "out" / "model.onnx", feeds),
        onnx_logits(apply_peft(int4["model"], int4["adapter"], output=tmp_path / "one.onnx").output, feeds),
    )
