"""onnxruntime-genai decoders (GroupQueryAttention, a symbolic head size) prove with generated inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from decoder_builders import genai_export, peft_adapter, proves_on_the_command_line, tiny_llama

HEAD, KV_HEADS = 16, 1


@pytest.mark.slow
def test_a_genai_decoder_proves_on_every_command_without_dims(tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path / "hf")
    base = genai_export(model_dir, tmp_path / "genai")
    # the builder packs q/k/v into attn.qkv_proj; the MLP keeps PEFT's module names
    adapter = peft_adapter(model_dir, tmp_path / "adapter", ["down_proj", "up_proj"])
    shapes = proves_on_the_command_line(base, model_dir, adapter, tmp_path)
    batch, seq = shapes["input_ids"]
    past = shapes["past_key_values.0.key"][2]
    assert shapes["past_key_values.0.key"] == [batch, KV_HEADS, past, HEAD]  # kv_cache_dim from the graph
    assert shapes["attention_mask"] == [batch, past + seq]  # total_sequence_length = past + sequence
    assert seq == 1 and batch == 2  # GroupQueryAttention: a decode step on a batch
