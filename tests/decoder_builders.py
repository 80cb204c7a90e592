"""Tiny random causal LMs with a KV cache, exported by the real tools (Optimum, onnxruntime-genai's builder).

Everything is built locally (no hub downloads): a save_pretrained'd LlamaForCausalLM (hidden 32, one layer,
vocab 96, head size 16: onnxruntime's GroupQueryAttention takes multiples of 16), a word-level tokenizer
(genai's builder copies one), and a PEFT adapter with random A and B.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lora_onnx.proofs.inputs import make_inputs
from lora_onnx.proofs.validation import create_session, input_specs, run_model

VOCAB = 96


def tiny_llama(folder: Path) -> Path:
    """A save_pretrained'd tiny random LlamaForCausalLM with a tokenizer, in ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    words = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t0"
    )
    tokenizer.save_pretrained(folder)
    return folder


def peft_adapter(model_dir: Path, folder: Path, targets: Sequence[str], seed: int = 1) -> Path:
    """A PEFT LoRA adapter (rank 4, alpha 8, random A and B) on ``targets`` of the model in ``model_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(folder)
    return folder


def genai_export(model_dir: Path, output: Path, precision: str = "fp32") -> Path:
    """onnxruntime-genai's model builder (fp32, or ``int4``: MatMulNBits; CPU) on the local folder
    ``model_dir``."""
    done = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(output),
         "-p", precision, "-e", "cpu", "-c", str(output.parent / "genai_cache")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return output / "model.onnx"


def optimum_export(model_dir: Path, output: Path) -> Path:
    """Optimum's export of ``model_dir`` as a causal LM with past key values."""
    from optimum.exporters.onnx import main_export

    main_export(str(model_dir), str(output), task="text-generation-with-past")
    return output / "model.onnx"


def generated_feeds(model: Path) -> dict[str, np.ndarray]:
    """The inputs a validation generates for ``model`` (no --dim)."""
    session = create_session(model, "CPUExecutionProvider")
    return make_inputs(input_specs(session), {}, 0, graph=onnx.load(model, load_external_data=False).graph)


def onnx_logits(model: Path, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    return run_model(create_session(model, "CPUExecutionProvider"), feeds, str(model))["logits"]


def peft_logits(model_dir: Path, adapter: Path | None, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The transformers model (with the PEFT ``adapter``) on ``feeds``: the cache from the past inputs."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    layers = sorted({int(name.split(".")[1]) for name in feeds if name.startswith("past_key_values.")})
    legacy = tuple(
        (
            torch.from_numpy(feeds[f"past_key_values.{i}.key"]),
            torch.from_numpy(feeds[f"past_key_values.{i}.value"]),
        )
        for i in layers
    )
    cache = (
        DynamicCache.from_legacy_cache(legacy)
        if hasattr(DynamicCache, "from_legacy_cache")
        else DynamicCache(legacy)
    )
    ids = torch.from_numpy(feeds["input_ids"])
    past = legacy[0][0].shape[2]
    positions = torch.arange(past, past + ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=torch.from_numpy(feeds["attention_mask"]), position_ids=positions,
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
    return out.logits.numpy()


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_onnx", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def proves_on_the_command_line(
    base: Path, model_dir: Path, adapter: Path, work: Path
) -> dict[str, list[int]]:
    """Every proving command on the decoder ``base`` with generated inputs and no --dim; the PEFT result's
    logits equal PEFT's on the generated inputs (rel <= 1e-4). Returns the generated input shapes."""
    fresh, zero, lora, merged, mixed = (
        work / f"{n}.onnx" for n in ("fresh", "zero", "peft", "merged", "mixed")
    )
    for args in (
        ("inject", base, "-o", fresh, "--init", "random", "--validate"),
        ("inject", base, "-o", zero, "--validate"),
        ("inject", base, "-o", lora, "--peft", adapter, "--validate"),
        ("merge", lora, "-o", merged, "--validate"),
        ("inject", base, "-o", mixed, "--mixed", "--peft", adapter, "--peft", adapter, "--validate"),
        ("batch", base, "-o", work / "batch", "--peft", adapter, "--validate"),
    ):
        done = cli(*args)
        assert done.returncode == 0, f"{args[0]}: {done.stderr[-1500:]}"
    report = work / "validate.json"
    same = cli("validate", base, zero, "--json", report)  # B = 0: the same outputs
    assert same.returncode == 0, same.stderr[-1500:]
    differs = cli("validate", base, fresh)  # random B: the proof can fail
    assert differs.returncode == 1, differs.stderr[-1500:]

    feeds = generated_feeds(base)
    want = peft_logits(model_dir, adapter, feeds)
    got = onnx_logits(lora, feeds)
    plain = peft_logits(model_dir, None, feeds)
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-4
    assert float(np.abs(plain - want).max() / np.abs(want).max()) > 1e-3  # the adapter changes the logits
    assert float(np.abs(onnx_logits(merged, feeds) - want).max() / np.abs(want).max()) <= 1e-4
    return json.loads(report.read_text())["inputs"]
