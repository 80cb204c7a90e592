"""Optimum's causal-LM exports with past key values prove with generated inputs (needs optimum-onnx)."""

from __future__ import annotations

from pathlib import Path

import pytest
from decoder_builders import optimum_export, peft_adapter, proves_on_the_command_line, tiny_llama

pytest.importorskip(
    "optimum.onnxruntime",
    reason="optimum-onnx pins transformers < 4.58: these run in .ci/run's optimum environment",
)


@pytest.mark.slow
def test_an_optimum_decoder_with_past_proves_on_every_command_without_dims(tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path / "hf")
    base = optimum_export(model_dir, tmp_path / "optimum")
    adapter = peft_adapter(model_dir, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    shapes = proves_on_the_command_line(base, model_dir, adapter, tmp_path)
    batch, seq = shapes["input_ids"]
    past = shapes["past_key_values.0.key"][2]
    assert seq > 1 and past >= 1 and past != seq
    # 'past_sequence_length + sequence_length' and the positions follow the past length
    assert shapes["attention_mask"] == [batch, past + seq] and shapes["position_ids"] == [batch, seq]
