"""Folders in, folders out, on a real Optimum seq2seq export (a tiny random T5, no hub downloads).

optimum-onnx's ``main_export`` writes encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx
(and, unless told not to, decoder_model_merged.onnx, whose layers sit inside an If). A PEFT adapter on q/v
of encoder and decoder is applied to the folder; every file must equal PEFT's PyTorch model (rel <= 1e-4),
unmerged and merged, and ORTModelForSeq2SeqLM must load the output folder and give PEFT's logits.

Needs optimum-onnx: the `optimum` extra, its own environment (.ci/run's second step; skipped elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "optimum.onnxruntime",
    reason="optimum-onnx pins transformers < 4.58: these run in .ci/run's optimum environment",
)

import onnxruntime as ort
import torch

from lora_onnx.commands.folder_exports import export_adapter_folder, export_peft_folder
from lora_onnx.commands.folder_mixed import inject_mixed_folder
from lora_onnx.commands.folders import apply_peft_folder, merge_folder
from lora_onnx.errors import AdapterError

pytestmark = pytest.mark.slow

SPLIT = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from optimum.exporters.onnx import main_export
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    base = T5ForConditionalGeneration(config).eval()
    base.save_pretrained(root / "hf")
    export = root / "export"
    main_export(str(root / "hf"), output=str(export), task="text2text-generation-with-past")
    split = root / "split"  # the folder without the merged decoder (what --no-post-process makes)
    split.mkdir()
    for path in export.iterdir():
        if path.name != "decoder_model_merged.onnx":
            shutil.copy(path, split / path.name)
    peft_model = get_peft_model(
        T5ForConditionalGeneration.from_pretrained(root / "hf"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "export": export, "split": split, "adapter": root / "adapter", "peft": peft_model}


def _feeds(session: ort.InferenceSession, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: values[i.name] for i in session.get_inputs()}


def _check_against_peft(
    folder: Path,
    peft_model: torch.nn.Module,
    *,
    index: int | None = None,
    adapters: dict[str, Path] | None = None,
) -> None:
    """Encoder output, decoder logits and the next step through decoder_with_past, each against PEFT.

    ``index``: feed it as ``lora_adapter_index`` (a mixed folder); ``adapters``: activate each model
    file's adapter file (``onnxruntime.LoraAdapter``) on its runs (a slotted folder)."""
    ids = np.array([[5, 9, 3, 17, 1]], np.int64)
    mask = np.ones_like(ids)
    decoder_ids = np.array([[0, 7, 4]], np.int64)
    with torch.no_grad():
        hidden = peft_model.get_encoder()(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
        steps = np.array([[0, 7, 4, 11]], np.int64)
        logits = peft_model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            decoder_input_ids=torch.from_numpy(steps),
        ).logits.numpy()  # fmt: skip
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {
        name: ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        for name in SPLIT
    }
    extra = {"lora_adapter_index": np.array([index], np.int64)} if index is not None else {}
    active: dict[str, ort.LoraAdapter] = {}  # alive while the runs use them

    def _run(name: str, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        run_options = ort.RunOptions()
        if adapters is not None and name in adapters:
            active[name] = ort.LoraAdapter()
            active[name].Load(str(adapters[name]))
            run_options.add_active_adapter(active[name])
        return sessions[name].run(None, _feeds(sessions[name], {**values, **extra}), run_options)

    (ort_hidden,) = _run("encoder_model.onnx", {"input_ids": ids, "attention_mask": mask})
    assert _rel(ort_hidden, hidden) <= 1e-4
    decoder = sessions["decoder_model.onnx"]
    values = {
        "input_ids": decoder_ids, "encoder_attention_mask": mask, "encoder_hidden_states": ort_hidden,
    }  # fmt: skip
    outputs = dict(
        zip([o.name for o in decoder.get_outputs()], _run("decoder_model.onnx", values), strict=True)
    )
    assert _rel(outputs["logits"], logits[:, :3]) <= 1e-4
    past = {name.replace("present", "past_key_values"): value for name, value in outputs.items()}
    values = {**past, "input_ids": steps[:, 3:], "encoder_attention_mask": mask}
    (next_logits, *_) = _run("decoder_with_past_model.onnx", values)
    assert _rel(next_logits, logits[:, 3:]) <= 1e-4


def test_split_export_unmerged_and_merged_equal_peft(t5: dict, tmp_path: Path) -> None:
    with pytest.raises(AssertionError):  # the base export is far from PEFT's output: the checks can fail
        _check_against_peft(t5["split"], t5["peft"])
    applied = apply_peft_folder(t5["split"], t5["adapter"], tmp_path / "applied", validate=True)
    assert applied.ok and applied.output == tmp_path / "applied"
    taken = {file.model: set(file.modules) for file in applied.files}
    # encoder keys only in the encoder (its paths are block.0..., a decoder key must not land there)
    assert taken["encoder_model.onnx"] and all(p.startswith("encoder.") for p in taken["encoder_model.onnx"])
    assert all(p.startswith("decoder.") for p in taken["decoder_model.onnx"])
    # decoder_with_past has no cross-attention k/v projections (the past holds them): fewer modules
    assert taken["decoder_with_past_model.onnx"] < taken["decoder_model.onnx"]
    assert {p for p in taken["decoder_model.onnx"] if "EncDecAttention.v" in p}
    assert sorted(path.name for path in applied.copied) == ["config.json", "generation_config.json"]
    _check_against_peft(tmp_path / "applied", t5["peft"])

    merged = apply_peft_folder(t5["split"], t5["adapter"], tmp_path / "merged", merge=True, validate=True)
    assert merged.ok and all(file.branches for file in merged.files)
    _check_against_peft(tmp_path / "merged", t5["peft"])

    # merge on the applied folder: the same plain models
    folded = merge_folder(tmp_path / "applied", tmp_path / "folded", validate=True)
    assert folded.ok and {file.model for file in folded.files if file.result is not None} == set(SPLIT)
    _check_against_peft(tmp_path / "folded", t5["peft"])


def test_export_adapter_and_mixed_on_the_split_folder(t5: dict, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import T5ForConditionalGeneration

    # one adapter file per slotted file: each, active on its file, gives PEFT's outputs
    slots, adapters = tmp_path / "slots", tmp_path / "adapters"
    apply_peft_folder(t5["split"], t5["adapter"], slots, as_inputs=True)
    exported = export_adapter_folder(peft=t5["adapter"], for_folder=slots, output=adapters)
    assert {f.model: len(f.modules) for f in exported.files} == {
        "encoder_model.onnx": 4, "decoder_model.onnx": 8, "decoder_with_past_model.onnx": 6,
    }  # fmt: skip
    with pytest.raises(AssertionError):  # no adapter active: the base, far from PEFT
        _check_against_peft(slots, t5["peft"])
    files = {name: adapters / name.replace(".onnx", ".onnx_adapter") for name in SPLIT}
    _check_against_peft(slots, t5["peft"], adapters=files)

    # the constant branches of the folder, back to one PEFT adapter: the adapter's own keys and tensors
    apply_peft_folder(t5["split"], t5["adapter"], tmp_path / "constant")
    gathered = export_peft_folder(tmp_path / "constant", tmp_path / "peft")
    assert "6 module(s) equal to decoder_model.onnx's" in gathered.files[1].note
    mine = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    theirs = load_file(str(t5["adapter"] / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)

    # mixed: another adapter at index 0, this one at 1, in every file; index 1 rows equal PEFT
    torch.manual_seed(3)
    other = get_peft_model(
        T5ForConditionalGeneration.from_pretrained(t5["root"] / "hf"),
        LoraConfig(r=2, lora_alpha=4, target_modules=["k", "o", "wi"], init_lora_weights=False),
    )
    other.save_pretrained(tmp_path / "other")
    mixed = inject_mixed_folder(
        t5["split"], [tmp_path / "other", t5["adapter"]], tmp_path / "mixed", validate=True
    )
    assert mixed.ok and all(f.branches for f in mixed.files)
    _check_against_peft(tmp_path / "mixed", t5["peft"], index=1)
    with pytest.raises(AssertionError):
        _check_against_peft(tmp_path / "mixed", t5["peft"], index=0)


def test_optimum_loads_the_output_folder(t5: dict, tmp_path: Path) -> None:
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    out = tmp_path / "out"
    apply_peft_folder(t5["split"], t5["adapter"], out)
    model = ORTModelForSeq2SeqLM.from_pretrained(out)
    ids = torch.tensor([[5, 9, 3, 17, 1]])
    decoder_ids = torch.tensor([[0, 7, 4]])
    with torch.no_grad():
        expected = t5["peft"](input_ids=ids, decoder_input_ids=decoder_ids).logits.numpy()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids).logits
    assert _rel(np.asarray(logits), expected) <= 1e-4
    generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        reference = t5["peft"].generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert generated.tolist() == reference.tolist()


def test_merged_decoder_with_if_is_refused(t5: dict, tmp_path: Path) -> None:
    # Optimum's default export adds decoder_model_merged.onnx, its layers inside an If: leaving it
    # unadapted would let ORTModelForSeq2SeqLM run the base decoder, so the folder is refused, naming it.
    with pytest.raises(AdapterError, match=r"decoder_model_merged\.onnx.*inside the .* subgraph of If"):
        apply_peft_folder(t5["export"], t5["adapter"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_folder_run_with_json_and_slots(t5: dict, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "lora_onnx", "inject", str(t5["split"]), "--peft", str(t5["adapter"]),
         "-o", str(tmp_path / "out"), "--json", str(report)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "decoder_with_past_model.onnx" in run.stdout and f"Wrote {tmp_path / 'out'}" in run.stdout
    data = json.loads(report.read_text())
    files = {entry["model"]: entry for entry in data["files"]}
    assert set(files) == set(SPLIT) and data["skipped_keys"] == []
    assert files["encoder_model.onnx"]["branches"] == 4  # q, v of 2 layers
    assert "decoder.block.1.layer.1.EncDecAttention.v" in files["decoder_model.onnx"]["modules"]
    assert "decoder.block.1.layer.1.EncDecAttention.v" not in files["decoder_with_past_model.onnx"]["modules"]

    slots = subprocess.run(
        [sys.executable, "-m", "lora_onnx", "inject", str(t5["split"]), "--peft", str(t5["adapter"]),
         "-o", str(tmp_path / "slots"), "--as-inputs", "--adapter-out", str(tmp_path / "adapters"),
         "--validate", "-q"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert slots.returncode == 0, slots.stderr
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == sorted(
        name.replace(".onnx", ".onnx_adapter") for name in SPLIT
    )
    # the slotted encoder with its adapter file active equals PEFT's encoder
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / "slots" / "encoder_model.onnx"), options)
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "adapters" / "encoder_model.onnx_adapter"))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    ids = np.array([[5, 9, 3, 17, 1]], np.int64)
    (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, run_options)
    with torch.no_grad():
        expected = t5["peft"].get_encoder()(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    assert _rel(hidden, expected) <= 1e-4


def test_bart_folder_equals_peft_through_optimum(tmp_path: Path) -> None:
    # BART's export paths differ from T5's (the encoder file keeps model.encoder..., as PEFT names it)
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from peft import LoraConfig, get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    )  # fmt: skip
    BartForConditionalGeneration(config).eval().save_pretrained(tmp_path / "hf")
    main_export(str(tmp_path / "hf"), output=str(tmp_path / "export"), task="text2text-generation-with-past",
                no_post_process=True)  # fmt: skip
    peft_model = get_peft_model(
        BartForConditionalGeneration.from_pretrained(tmp_path / "hf"),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, decoder_ids = torch.tensor([[0, 5, 9, 3, 2]]), torch.tensor([[2, 0, 7]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids, decoder_input_ids=decoder_ids).logits.numpy()
    base = ORTModelForSeq2SeqLM.from_pretrained(tmp_path / "export")
    base_logits = base(
        input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids
    ).logits
    assert _rel(np.asarray(base_logits), expected) > 1e-3  # the adapter matters: the check below can fail
    for merge in (False, True):
        out = tmp_path / f"out_{merge}"
        result = apply_peft_folder(tmp_path / "export", tmp_path / "adapter", out, merge=merge)
        assert {f.model: f.branches for f in result.files} == {
            "encoder_model.onnx": 4, "decoder_model.onnx": 8, "decoder_with_past_model.onnx": 6,
        }  # fmt: skip
        model = ORTModelForSeq2SeqLM.from_pretrained(out)
        logits = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids
        ).logits
        assert _rel(np.asarray(logits), expected) <= 1e-4, merge
