"""An onnxruntime-genai model folder (made by its model builder from a tiny random Llama) in, a folder out
that ``og.Model`` loads: model.onnx with its own model.onnx.data, genai_config.json and the tokenizer files.

Only loading and running are checked here, against onnxruntime on the same file: on this tiny model the
builder's own graph differs from PyTorch (its lm_head reads layer 0's norm), so PEFT parity of genai models
belongs to the real-exports tests, not to the folder handling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
import torch

from lora_onnx.commands.folders import apply_peft_folder

pytestmark = pytest.mark.slow

IDS = np.array([[3, 7, 9, 12]], np.int64)


@pytest.fixture(scope="module")
def genai(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "hf")
    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(64)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2")
    fast.save_pretrained(root / "hf")
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(root / "hf"), "-i",
         str(root / "hf"), "-o", str(root / "genai"), "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")],
        check=True, capture_output=True,
    )  # fmt: skip
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(root / "adapter")
    return {"folder": root / "genai", "adapter": root / "adapter"}


def _ort(path: Path) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options)
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = np.zeros((1, 2, 0, 16), np.float32)
    return session.run(None, feeds)


def _og_logits(folder: Path) -> np.ndarray:
    model = og.Model(str(folder))
    generator = og.Generator(model, og.GeneratorParams(model))
    generator.append_tokens(IDS)
    return np.asarray(generator.get_output("logits"))


def test_og_loads_the_output_folder(genai: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # (no validate=True: generated inputs for GroupQueryAttention's past are the KV-cache bullet of issue 14)
    result = apply_peft_folder(genai["folder"], genai["adapter"], out)
    assert result.ok and [(f.model, f.branches) for f in result.files] == [("model.onnx", 6)]
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in result.copied}
    assert (out / "model.onnx.data").is_file()  # its own data, not a link to the input's
    assert not (out / "model.onnx.data").samefile(genai["folder"] / "model.onnx.data")
    # og runs the rewritten file: its logits are onnxruntime's on that file
    logits = _og_logits(out)
    outputs = _ort(out / "model.onnx")
    assert np.allclose(logits, outputs[0], rtol=1e-5, atol=1e-6)
    # and the adapter is live (the MLP adapters change the later layers' key / value caches)
    base = _ort(genai["folder"] / "model.onnx")
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(outputs[1:], base[1:], strict=True))


def _og_run(folder: Path, adapter_file: Path | None = None) -> list[np.ndarray]:
    """og's logits and layer 1's key cache (the positions IDS filled), with ``adapter_file`` active."""
    model = og.Model(str(folder))
    generator = og.Generator(model, og.GeneratorParams(model))
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "mine")
        generator.set_active_adapter(adapters, "mine")
    generator.append_tokens(IDS)
    key = np.asarray(generator.get_output("present.1.key"))[:, :, : IDS.shape[1]]
    return [np.asarray(generator.get_output("logits")), key]


def test_og_adapters_take_the_per_file_adapter_of_a_slotted_folder(
    genai: dict[str, Path], tmp_path: Path
) -> None:
    # inject DIR --as-inputs, then export-adapter --peft ADAPTER --for SLOTS_DIR: og.Adapters loads the file
    # and og's outputs with it active equal the constant branches' (inject DIR --peft)
    from lora_onnx.commands.folder_exports import export_adapter_folder

    slots, constant = tmp_path / "slots", tmp_path / "constant"
    apply_peft_folder(genai["folder"], genai["adapter"], slots, as_inputs=True)
    apply_peft_folder(genai["folder"], genai["adapter"], constant)
    result = export_adapter_folder(peft=genai["adapter"], for_folder=slots, output=tmp_path / "adapters")
    assert [(f.model, len(f.modules)) for f in result.files] == [("model.onnx", 6)]
    assert (slots / "genai_config.json").is_file()
    active = _og_run(slots, tmp_path / "adapters" / "model.onnx_adapter")
    for mine, theirs in zip(active, _og_run(constant), strict=True):
        assert np.allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(active[1], _og_run(slots)[1], atol=1e-4)  # the adapter is live in og
    # in onnxruntime, every output of the slotted file with the file active equals the constant branches'
    # (and the adapter is live: the MLP adapters change the later layers' key / value caches)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(slots / "model.onnx"), options)
    lora = ort.LoraAdapter()
    lora.Load(str(tmp_path / "adapters" / "model.onnx_adapter"))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = np.zeros((1, 2, 0, 16), np.float32)
    outputs = session.run(None, feeds, run_options)
    for mine, theirs in zip(outputs, _ort(constant / "model.onnx"), strict=True):
        assert np.allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    base = _ort(genai["folder"] / "model.onnx")
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(outputs[1:], base[1:], strict=True))


def test_mixed_genai_folder(genai: dict[str, Path], tmp_path: Path) -> None:
    # inject DIR --mixed: the genai folder keeps its side files; row 0 runs the adapter, row 1 the base
    from lora_onnx.commands.folder_mixed import inject_mixed_folder

    out = tmp_path / "mixed"
    result = inject_mixed_folder(genai["folder"], [genai["adapter"]], out, validate=True)
    assert result.ok and [(f.model, f.branches) for f in result.files] == [("model.onnx", 6)]
    assert (out / "genai_config.json").is_file()
    constant = tmp_path / "constant"
    apply_peft_folder(genai["folder"], genai["adapter"], constant)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out / "model.onnx"), options)
    ids = np.concatenate([IDS, IDS])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "lora_adapter_index": np.array([0, -1])}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = np.zeros((2, 2, 0, 16), np.float32)
    outputs = session.run(None, feeds)
    adapted, base = _ort(constant / "model.onnx"), _ort(genai["folder"] / "model.onnx")
    for mine, one, other in zip(outputs, adapted, base, strict=True):
        assert np.allclose(mine[:1], one, rtol=1e-4, atol=1e-5)
        assert np.allclose(mine[1:], other, rtol=1e-4, atol=1e-5)
