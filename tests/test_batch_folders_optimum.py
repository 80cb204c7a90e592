"""``batch --peft`` on a real Optimum seq2seq export (encoder_model.onnx, decoder_model.onnx,
decoder_with_past_model.onnx, config files): the folder is one unit, every file equal to PEFT (rel <= 1e-4),
unmerged and merged; ORTModelForSeq2SeqLM loads the output folder. The same checks without Optimum, on a
torch.onnx split export, are in test_batch_folders.py.

Needs optimum-onnx: the `optimum` extra, its own environment (.ci/run's second step; skipped elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip(
    "optimum.onnxruntime",
    reason="optimum-onnx pins transformers < 4.58: these run in .ci/run's optimum environment",
)

import numpy as np
import torch
from batch_helpers import cli
from test_folders_seq2seq import (
    SPLIT,
    _check_against_peft,
    _rel,
    t5,  # noqa: F401  (the Optimum export fixture, reused)
)

from lora_onnx.commands.reports import read_report

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_batch_converts_the_optimum_folder_as_one_unit(t5: dict, tmp_path: Path, merge: bool) -> None:  # noqa: F811
    out = tmp_path / "out"
    done = cli("batch", t5["split"], "-o", out, "--peft", t5["adapter"], "--validate",
               *(["--merge"] if merge else []), "--report", tmp_path / "r.json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    _check_against_peft(out, t5["peft"])
    report = read_report(tmp_path / "r.json")
    models = {m.path: m for m in report.models}
    assert set(models) == set(SPLIT) and all(m.status == "ok" and m.folder == "." for m in models.values())
    # decoder_with_past has no cross-attention k / v (its past holds them): fewer modules, yet no error
    assert set(models["decoder_with_past_model.onnx"].modules) < set(models["decoder_model.onnx"].modules)
    assert all(m.validation is not None and m.validation["ok"] for m in models.values())
    (folder,) = report.folders
    assert sorted(Path(p).name for p in folder.copied) == ["config.json", "generation_config.json"]

    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    model = ORTModelForSeq2SeqLM.from_pretrained(out)
    ids, decoder_ids = torch.tensor([[5, 9, 3, 17, 1]]), torch.tensor([[0, 7, 4]])
    with torch.no_grad():
        expected = t5["peft"](input_ids=ids, decoder_input_ids=decoder_ids).logits.numpy()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids).logits
    assert _rel(np.asarray(logits), expected) <= 1e-4
