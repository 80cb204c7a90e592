"""``batch --peft`` over folders (issue 14): a folder is one export, maybe split into several files, so the
adapter is routed across its files as ``inject FOLDER --peft`` routes it, the folder converting whole or not
at all; recipes, files and globs stay independent models; ``batch --merge`` reports the weights it untied.

The split export is Optimum's seq2seq layout without Optimum: a tiny random T5 whose encoder stack and
decoder (+ lm_head) are exported by torch.onnx (TorchScript) as ``encoder_model.onnx`` (module paths
``block.0...``) and ``decoder_model.onnx`` (``decoder.block.0...``, ``lm_head``), with ``config.json`` and
``generation_config.json`` beside them. The reference is PEFT's own PyTorch model (rel <= 1e-4).
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from batch_helpers import cli, files_under
from builders import rel_err, run, write_adapter
from test_folders_routing import INPUTS as PIPELINE_INPUTS
from test_folders_routing import SIDE as PIPELINE_SIDE
from test_folders_routing import pipeline  # noqa: F401  (the diffusers-layout fixture, reused)
from test_tied_weights import _tied
from torch import nn

from lora_onnx.commands.batch import AdapterSource, BatchOptions, plan_batch, run_batch
from lora_onnx.commands.folders import apply_peft_folder
from lora_onnx.commands.reports import Shard, junit_xml, merge_reports, read_report
from lora_onnx.errors import OutputError
from lora_onnx.model.manifest import read_branches
from lora_onnx.proofs import validation
from lora_onnx.recipes.config import LoraConfig

pytestmark = pytest.mark.slow

SPLIT = ("decoder_model.onnx", "encoder_model.onnx")
IDS = np.array([[5, 9, 3, 17, 1], [4, 2, 8, 1, 0]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.int64)
DECODER_IDS = np.array([[0, 7, 4], [0, 3, 3]], np.int64)


class _Encoder(nn.Module):
    """The encoder stack as the export's root (its children registered here, so paths are ``block.0...``,
    as in Optimum's encoder_model.onnx)."""

    def __init__(self, stack: nn.Module) -> None:
        super().__init__()
        for name, child in stack.named_children():
            self.add_module(name, child)
        self._stack = [stack]  # not a submodule: the paths stay rooted here

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._stack[0](input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class _Decoder(nn.Module):
    """decoder + lm_head (Optimum's decoder_model.onnx: paths ``decoder.block.0...`` and ``lm_head``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.lm_head = model.lm_head

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask):  # type: ignore[no-untyped-def]
        hidden = self.decoder(
            input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, use_cache=False, return_dict=False,
        )[0]  # fmt: skip
        return self.lm_head(hidden)


def _export_t5(model: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True)
    ids, mask = torch.from_numpy(IDS), torch.from_numpy(MASK)
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    dims = {0: "batch", 1: "encoder_sequence"}
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Encoder(model.encoder), (ids, mask), str(folder / "encoder_model.onnx"), dynamo=False,
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dims, "attention_mask": dims},
        )  # fmt: skip
        torch.onnx.export(
            _Decoder(model), (torch.from_numpy(DECODER_IDS), hidden, mask),
            str(folder / "decoder_model.onnx"), dynamo=False, output_names=["logits"],
            input_names=["input_ids", "encoder_hidden_states", "encoder_attention_mask"],
            dynamic_axes={"input_ids": {0: "batch", 1: "decoder_sequence"}, "encoder_hidden_states": dims,
                          "encoder_attention_mask": dims},
        )  # fmt: skip
    model.config.save_pretrained(folder)  # config.json
    (folder / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 0}))


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5_split")
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    base = T5ForConditionalGeneration(config).eval()
    exports = root / "exports"
    _export_t5(base, exports / "t5a")
    shutil.copytree(exports / "t5a", exports / "t5b")  # a second export of the same model
    torch.manual_seed(1)
    peft_model = get_peft_model(
        base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False)
    ).eval()
    peft_model.save_pretrained(root / "adapter")
    with torch.no_grad():
        ids, mask = torch.from_numpy(IDS), torch.from_numpy(MASK)
        hidden = peft_model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = peft_model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=torch.from_numpy(DECODER_IDS)
        ).logits
    # A key no file of the folder carries: an encoder block the export does not have.
    from safetensors.numpy import load_file

    tensors = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    for key in [k for k in tensors if ".encoder.block.0.layer.0.SelfAttention.q." in k]:
        tensors[key.replace("block.0.", "block.7.")] = tensors[key]
    extra = write_adapter(root / "adapter_extra", tensors, r=4, lora_alpha=8, target_modules=["q", "v"])
    return {
        "root": root, "exports": exports, "adapter": root / "adapter", "extra": extra,
        "hidden": hidden.numpy(), "logits": logits.numpy(),
    }  # fmt: skip


def _outputs(folder: Path, hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's hidden states and the decoder's logits of the folder's files in onnxruntime (the
    decoder fed ``hidden`` when given, else the file's own encoder output)."""
    (encoded,) = run(folder / "encoder_model.onnx", {"input_ids": IDS, "attention_mask": MASK})
    feeds = {
        "input_ids": DECODER_IDS,
        "encoder_hidden_states": encoded if hidden is None else hidden,
        "encoder_attention_mask": MASK,
    }
    (logits,) = run(folder / "decoder_model.onnx", feeds)
    return encoded, logits


def _check_against_peft(folder: Path, t5: dict) -> None:
    encoded, logits = _outputs(folder)
    assert rel_err(encoded, t5["hidden"]) <= 1e-4
    assert rel_err(logits, t5["logits"]) <= 1e-4


def test_a_split_export_is_one_unit_routed_as_inject_folder_routes_it(t5: dict, tmp_path: Path) -> None:
    exports, out = t5["exports"], tmp_path / "out"
    _, base_logits = _outputs(exports / "t5a")
    assert rel_err(base_logits, t5["logits"]) > 1e-3  # the adapter changes the logits
    done = cli(
        "batch", exports / "t5a", exports / "t5b", "-o", out, "--peft", t5["adapter"], "--validate",
        "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2 folder(s) converted as one unit each" in done.stdout
    for unit in ("t5a", "t5b"):  # OUTDIR/<folder name>/, the folder's layout and side files
        assert files_under(out / unit) == ["config.json", "decoder_model.onnx", "encoder_model.onnx",
                                           "generation_config.json"]  # fmt: skip
        _check_against_peft(out / unit, t5)
    report = read_report(tmp_path / "r.json")
    assert [(m.path, m.status, m.folder) for m in report.models] == [
        ("t5a/decoder_model.onnx", "ok", "t5a"), ("t5a/encoder_model.onnx", "ok", "t5a"),
        ("t5b/decoder_model.onnx", "ok", "t5b"), ("t5b/encoder_model.onnx", "ok", "t5b"),
    ]  # fmt: skip
    decoder, encoder = report.models[:2]
    # each file took the keys it carries: the encoder's q / v (2 layers x 2) and the decoder's self- and
    # cross-attention q / v (2 layers x 4); every module named as the adapter names it
    assert sorted(encoder.modules) == sorted(
        f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in range(2) for m in "qv"
    )
    assert (encoder.sites, decoder.sites) == (4, 8)
    assert all(m.startswith("decoder.block.") for m in decoder.modules) and len(decoder.modules) == 8
    for model in (decoder, encoder):
        assert model.validation is not None and model.validation["ok"]  # per file, as inject FOLDER proves
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["models"] == 4 and data["total"] == 4
    (folder_a, folder_b) = data["folders"]
    assert (folder_a["path"], folder_a["status"], folder_a["models"]) == (
        "t5a", "ok", ["t5a/decoder_model.onnx", "t5a/encoder_model.onnx"]
    )  # fmt: skip
    assert sorted(Path(p).name for p in folder_a["copied"]) == ["config.json", "generation_config.json"]
    assert folder_b["output"] == str(out / "t5b")
    assert data["models"][1]["folder"] == "t5a" and data["models"][1]["modules"] == list(encoder.modules)
    assert 'tests="4"' in (tmp_path / "j.xml").read_text() and "converted as one unit" in junit_xml(report)
    # the same files as inject FOLDER --peft writes
    single = apply_peft_folder(exports / "t5a", t5["adapter"], tmp_path / "inject")
    for name in SPLIT:
        ours = read_branches(onnx.load(out / "t5a" / name, load_external_data=False))
        theirs = read_branches(onnx.load(tmp_path / "inject" / name, load_external_data=False))
        assert ours == theirs
    assert single.ok


def test_a_key_no_file_carries_fails_the_unit(t5: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = t5["exports"] / "t5a"
    done = cli("batch", folder, "-o", out, "--peft", t5["extra"], "--report", tmp_path / "r.json")
    assert done.returncode == 2, done.stderr
    assert files_under(out) == [], "nothing of a failed folder is written"
    report = read_report(tmp_path / "r.json")
    assert [(m.path, m.status) for m in report.models] == [
        ("decoder_model.onnx", "failed"), ("encoder_model.onnx", "failed")
    ]  # fmt: skip
    (unit,) = report.folders
    assert unit.path == "." and unit.status == "failed"
    assert unit.error is not None and "encoder.block.7.layer.0.SelfAttention.q" in unit.error
    assert "matches no module of the model files" in unit.error and "tried" in unit.error
    assert report.models[1].error == unit.error  # every file carries the folder's error ...
    assert f"folder {folder}: {unit.error}; none of its 2 file(s) was written" in done.stderr
    assert done.stderr.count(unit.error) == 1  # ... said once on the command line
    assert "encoder_model.onnx: failed with its folder (the error above)" in done.stdout
    # a key missing from one file only is fine (the encoder has no decoder keys); --skip-unmatched skips
    # a key no file has and lists it
    done = cli("batch", folder, "-o", out, "--peft", t5["extra"], "--skip-unmatched", "--validate",
               "--report", tmp_path / "r.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    _check_against_peft(out, t5)
    (unit,) = read_report(tmp_path / "r.json").folders
    assert unit.skipped_keys == tuple(
        f"base_model.model.encoder.block.7.layer.0.SelfAttention.q.lora_{m}.weight" for m in "AB"
    )
    assert "no model file has (--skip-unmatched)" in unit.warnings[0]
    recipe = cli("batch", folder, "-o", tmp_path / "o2", "--rank", "2", "--skip-unmatched")
    assert recipe.returncode == 2 and "--skip-unmatched applies with --peft" in recipe.stderr


def test_merge_folds_every_file_of_the_unit(t5: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = cli("batch", t5["exports"] / "t5a", "-o", out, "--peft", t5["adapter"], "--merge", "--validate",
               "--report", tmp_path / "r.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in SPLIT:
        assert read_branches(onnx.load(out / name, load_external_data=False)) == ()  # plain models
    _check_against_peft(out, t5)
    assert {m.path: (m.status, m.sites) for m in read_report(tmp_path / "r.json").models} == {
        "decoder_model.onnx": ("ok", 8), "encoder_model.onnx": ("ok", 4)
    }  # fmt: skip


def test_a_failed_proof_in_one_file_fails_the_unit(
    t5: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder's proof disagrees (made to): the whole folder mismatches, nothing of it is written."""
    real = validation.validate

    def decoder_disagrees(reference, candidate, **kwargs):  # type: ignore[no-untyped-def]
        report = real(reference, candidate, **kwargs)
        if reference.path is not None and reference.path.name == "decoder_model.onnx":
            bad = replace(report.comparisons[0], ok=False, max_abs=1.0, max_rel=0.5)
            report = replace(report, comparisons=(bad, *report.comparisons[1:]))
        return report

    monkeypatch.setattr(validation, "validate", decoder_disagrees)
    out = tmp_path / "out"
    report = run_batch(
        [t5["exports"] / "t5a"], out, BatchOptions(AdapterSource(t5["adapter"]), validate=True)
    )
    assert report.exit_code == 1 and files_under(out) == []
    decoder, encoder = report.models
    assert (decoder.status, encoder.status) == ("mismatch", "mismatch")
    assert decoder.mismatches and "max rel err 0.5" in decoder.mismatches[0]
    assert encoder.validation is not None and encoder.validation["ok"]  # its own proof passed ...
    assert encoder.message == "not written: decoder_model.onnx of the folder disagreed in its proof"
    assert report.folders[0].status == "mismatch"


def test_recipes_files_and_globs_stay_independent(t5: dict, tmp_path: Path) -> None:
    folder = t5["exports"] / "t5a"
    # a recipe: each file on its own, as before
    recipe = run_batch([folder], tmp_path / "recipe", BatchOptions(LoraConfig(rank=2)))
    assert [(m.path, m.status, m.folder) for m in recipe.models] == [
        ("decoder_model.onnx", "ok", None), ("encoder_model.onnx", "ok", None)
    ]  # fmt: skip
    assert recipe.folders == () and json.loads(json.dumps(recipe.to_json()))["folders"] == []
    # a file given alone is one model: the encoder alone cannot take the decoder's keys
    alone = run_batch(
        [folder / "encoder_model.onnx"], tmp_path / "alone", BatchOptions(AdapterSource(t5["adapter"]))
    )
    (encoder,) = alone.models
    assert (
        encoder.status == "failed" and encoder.folder is None and "decoder.block.0" in (encoder.error or "")
    )
    # a glob names files, not a unit
    globbed = plan_batch([str(folder / "*.onnx")], tmp_path / "g", folders=True)
    assert [(j.path, j.is_folder) for j in globbed.jobs] == [("decoder_model.onnx", False),
                                                             ("encoder_model.onnx", False)]  # fmt: skip
    # a file inside a folder unit is converted with it, once; a folder inside another is refused
    with_file = plan_batch([folder, folder / "encoder_model.onnx"], tmp_path / "w", folders=True)
    assert [(j.path, j.models) for j in with_file.jobs] == [(".", SPLIT)] and with_file.total == 2
    with pytest.raises(OutputError, match="is inside the input folder"):
        plan_batch([t5["exports"], folder], tmp_path / "n", folders=True)
    with pytest.raises(OutputError, match="converts as one unit"):
        plan_batch([folder], folder / "converted", folders=True)


def test_units_shard_skip_existing_and_run_in_parallel(t5: dict, tmp_path: Path) -> None:
    exports, out = t5["exports"], tmp_path / "out"
    options = BatchOptions(AdapterSource(t5["adapter"]))
    parts = [run_batch([exports / "t5a", exports / "t5b"], out, options, shard=Shard(i, 2)) for i in (1, 2)]
    assert [[m.path for m in part.models] for part in parts] == [
        ["t5a/decoder_model.onnx", "t5a/encoder_model.onnx"],
        ["t5b/decoder_model.onnx", "t5b/encoder_model.onnx"],
    ]
    merged = merge_reports([("1", parts[0]), ("2", parts[1])])
    assert [f.path for f in merged.folders] == ["t5a", "t5b"] and merged.total == 4 and merged.exit_code == 0
    for unit in ("t5a", "t5b"):
        _check_against_peft(out / unit, t5)
    again = run_batch([exports / "t5a", exports / "t5b"], out, replace(options, skip_existing=True))
    assert {m.status for m in again.models} == {"skipped"} and [f.status for f in again.folders] == [
        "skipped", "skipped"
    ]  # fmt: skip
    assert [m.sites for m in again.models] == [8, 4, 8, 4]
    # two worker processes, a unit each: the same files
    parallel = run_batch([exports / "t5a", exports / "t5b"], tmp_path / "parallel", options, jobs=2)
    assert [(m.path, m.status) for m in parallel.models] == [(m.path, "ok") for m in merged.models]
    for unit in ("t5a", "t5b"):
        _check_against_peft(tmp_path / "parallel" / unit, t5)


def test_a_pipeline_folder_routes_components(pipeline: dict, tmp_path: Path) -> None:  # noqa: F811
    """diffusers layout (unet/, text_encoder/, text_encoder_2/): prefixed keys reach their component only."""
    out = tmp_path / "out"
    done = cli("batch", pipeline["folder"], "-o", out, "--peft", pipeline["adapter"], "--validate",
               "--report", tmp_path / "r.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name, x in PIPELINE_INPUTS.items():
        (got,) = run(out / name / "model.onnx", {"x": x})
        assert rel_err(got, pipeline["expected"][name]) <= 1e-4
    assert all((out / name).is_file() for name in PIPELINE_SIDE)
    models = {m.path: m for m in read_report(tmp_path / "r.json").models}
    assert all(m.startswith("unet.") for m in models["unet/model.onnx"].modules)
    assert all(m.startswith("text_encoder_2.") for m in models["text_encoder_2/model.onnx"].modules)


# ---- batch --merge: the notes of weights it untied ------------------------------------------------


def test_batch_merge_reports_untied_weights(tmp_path: Path) -> None:
    """A tied table (GPT-2's wte / lm_head): a recipe's --merge per file, and a PEFT folder's, say which
    node got its own folded copy, on the command line and in the report."""
    (tmp_path / "in").mkdir()
    onnx.save(_tied(), tmp_path / "in" / "tied.onnx")
    done = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--target", "lm_head", "--init", "random",
               "--merge", "--validate", "--report", tmp_path / "r.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (model,) = read_report(tmp_path / "r.json").models
    (note,) = model.notes
    assert "untied shared weight" in note and "keeps the base" in note
    assert f"note: {note}" in done.stdout
    assert json.loads((tmp_path / "r.json").read_text())["models"][0]["notes"] == [note]

    rng = np.random.default_rng(3)
    adapter = write_adapter(
        tmp_path / "adapter",
        {"base_model.model.lm_head.lora_A.weight": rng.standard_normal((2, 6)).astype(np.float32),
         "base_model.model.lm_head.lora_B.weight": rng.standard_normal((32, 2)).astype(np.float32)},
        target_modules=["lm_head"],
    )  # fmt: skip
    (tmp_path / "in" / "config.json").write_text("{}")
    done = cli("batch", tmp_path / "in", "-o", tmp_path / "out2", "--peft", adapter, "--merge", "--validate",
               "--report", tmp_path / "r2.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (model,) = read_report(tmp_path / "r2.json").models
    assert model.folder == "." and len(model.notes) == 1 and "untied shared weight" in model.notes[0]
    assert f"note: {model.notes[0]}" in done.stdout and (tmp_path / "out2" / "config.json").is_file()
    ids = np.array([[1, 5, 11], [0, 3, 3]], np.int64)
    apply_peft_folder(tmp_path / "in", adapter, tmp_path / "unmerged")
    (unmerged,) = run(tmp_path / "unmerged" / "tied.onnx", {"ids": ids})
    (merged,) = run(tmp_path / "out2" / "tied.onnx", {"ids": ids})
    assert rel_err(merged, unmerged) <= 1e-5 and rel_err(unmerged, run(_tied(), {"ids": ids})[0]) > 1e-3
    # inject FOLDER --peft --merge (and its --json) say it too
    done = cli("inject", tmp_path / "in", "--peft", adapter, "--merge", "-o", tmp_path / "out3",
               "--json", tmp_path / "r3.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"note: tied.onnx: {model.notes[0]}" in done.stdout
    assert json.loads((tmp_path / "r3.json").read_text())["notes"] == [f"tied.onnx: {model.notes[0]}"]
