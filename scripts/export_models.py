"""Regenerate the small sample models bundled in ``models/``.

Usage (from the repository root, with the dev environment that has torch==2.13.0 and transformers)::

    python scripts/export_models.py [--out models] [--only tiny_llama tiny_bert tiny_gpt2 convnet]

Every model gets random weights from a fixed seed, so running the script again gives the same models.
The exporters' own file layout is kept as is: the dynamo exporter writes ``model.onnx`` plus external data
in ``model.onnx.data`` (even for tiny models), the TorchScript exporter writes ``model.onnx`` alone.

After each export the model is loaded in onnxruntime (CPU) and run on fresh random inputs whose shapes
differ from the export example (so the dynamic dims are exercised); the outputs must be finite and match
torch (rtol 1e-4). A model is only moved into place once it passes, and must stay under 2 MB.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
MAX_BYTES = 2 * 1024 * 1024
RTOL = 1e-4
ATOL = 1e-5
VOCAB = 256


def _feeds_lm(gen: torch.Generator, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask whose first row is left-padded."""
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, : seq // 3] = 0
    return ids, mask


def _check(
    model_dir: Path,
    feeds: dict[str, torch.Tensor],
    expected: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> float:
    """Run the exported model in onnxruntime CPU and compare its first output with torch's.

    ``keep`` (broadcastable to the output's leading dims) restricts the comparison to positions whose
    result is defined, e.g. the non-padded tokens of a left-padded batch. Returns the max abs difference.
    """
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {name: t.numpy() for name, t in feeds.items()})[0]
    want = expected.detach().numpy()
    if got.shape != want.shape:
        raise AssertionError(f"{model_dir.name}: onnxruntime shape {got.shape} != torch shape {want.shape}")
    if not np.isfinite(got).all():
        raise AssertionError(f"{model_dir.name}: onnxruntime output has non-finite values")
    if keep is not None:
        sel = keep.numpy().astype(bool)
        got, want = got[sel], want[sel]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{model_dir.name}: ORT != torch")
    return float(np.abs(got - want).max())


def export_tiny_llama(model_dir: Path) -> float:
    """Tiny Llama decoder (GQA), dynamo exporter, inputs input_ids + attention_mask, output logits."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids, mask = _feeds_lm(gen, 2, 8)
    # The output is a CausalLMOutputWithPast holding only `logits` (no loss, no cache with use_cache=False).
    with warnings.catch_warnings():
        # Noise only: torch-internal FutureWarnings, and a note that both inputs share the "sequence" dim.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (),
            str(model_dir / "model.onnx"),
            kwargs={"input_ids": ids, "attention_mask": mask},
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
            },
            verbose=False,
        )
    ids, mask = _feeds_lm(gen, 3, 11)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    # With SDPA attention (transformers' default), the rows of fully masked (padded) queries are undefined
    # and torch and onnxruntime fill them differently, so only real tokens are compared.
    return _check(model_dir, {"input_ids": ids, "attention_mask": mask}, expected, keep=mask)


def export_tiny_bert(model_dir: Path) -> float:
    """Tiny BERT with a sequence-classification head, TorchScript exporter (opset 17), output logits."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)

    def feeds(batch: int, seq: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[0, seq // 2 + 1 :] = 0
        types = torch.zeros(batch, seq, dtype=torch.int64)
        types[:, seq // 2 :] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    example = feeds(2, 8)
    names = list(example)
    with warnings.catch_warnings():
        # TracerWarnings about Python-side shape checks in transformers' mask code: they hold for every
        # shape (mask length == sequence length), and the check below runs another shape to prove it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(example.values()),
            str(model_dir / "model.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}},
        )
    check_feeds = feeds(3, 11)
    with torch.no_grad():
        expected = model(**check_feeds).logits
    return _check(model_dir, check_feeds, expected)


class _GPT2Logits(GPT2LMHeadModel):
    """GPT2LMHeadModel whose forward takes (input_ids, attention_mask) and returns logits only.

    A subclass rather than a wrapper module keeps the module paths (transformer.h.0.attn.c_attn) unprefixed,
    and fixed positional inputs stop the TorchScript exporter from turning `logits_to_keep` into an input.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask).logits


def export_tiny_gpt2(model_dir: Path) -> float:
    """Tiny GPT-2 (Conv1D layers, tied lm_head), TorchScript exporter (opset 17), output logits."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    model = _GPT2Logits(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids, mask = _feeds_lm(gen, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings, see export_tiny_bert
        torch.onnx.export(
            model,
            (ids, mask),
            str(model_dir / "model.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"},
            },
        )
    ids, mask = _feeds_lm(gen, 3, 11)
    with torch.no_grad():
        expected = model(ids, mask)
    return _check(model_dir, {"input_ids": ids, "attention_mask": mask}, expected, keep=mask)


class ConvNet(nn.Module):
    """Small conv net covering the Conv variants LoRA must handle, plus Linear layers.

    Main path [N,3,32,32]: strided+padded conv, dilated conv, grouped conv (groups=4), strided depthwise
    conv (groups=32), then a 1x1 conv followed by BatchNorm, which the dynamo exporter's optimizer fuses into
    the conv (a real-world trap: the exported weight is no longer the module's). Side branches reshape the
    feature map for a Conv1d (followed by a Linear on a 3-D tensor, i.e. MatMul) and a Conv3d. A Linear
    head on the pooled features gives a Gemm.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, kernel_size=3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(16, 32, kernel_size=3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, kernel_size=3, stride=2, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 32, kernel_size=1)
        self.bn = nn.BatchNorm2d(32)
        self.seq_conv = nn.Conv1d(32, 16, kernel_size=5, stride=2, padding=2)
        self.seq_proj = nn.Linear(16, 16)
        self.vol_conv = nn.Conv3d(8, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(32 + 16 + 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))  # [N, 16, 16, 16]
        x = torch.relu(self.dilated(x))
        x = torch.relu(self.grouped(x))  # [N, 32, 16, 16]
        x = torch.relu(self.depthwise(x))  # [N, 32, 8, 8]
        x = torch.relu(self.bn(self.pointwise(x)))
        seq = torch.relu(self.seq_conv(x.flatten(2)))  # [N, 16, 32]
        seq = self.seq_proj(seq.transpose(1, 2))  # [N, 32, 16]
        vol = x.reshape(x.shape[0], 8, 4, 8, 8)  # channels split into 8 x depth 4
        vol = torch.relu(self.vol_conv(vol))  # [N, 8, 4, 8, 8]
        pooled = torch.cat([x.mean(dim=(2, 3)), seq.mean(dim=1), vol.mean(dim=(2, 3, 4))], dim=1)
        return self.head(pooled)


def export_convnet(model_dir: Path) -> float:
    """The ConvNet above, dynamo exporter, input [N, 3, 32, 32] with dynamic batch, output logits."""
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        # Non-trivial statistics and affine parameters so the BatchNorm is not an identity.
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    example = torch.randn(2, 3, 32, 32, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-internal FutureWarnings, see export_tiny_llama
        torch.onnx.export(
            model,
            (example,),
            str(model_dir / "model.onnx"),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: "batch"}},
            verbose=False,
        )
    x = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        expected = model(x)
    return _check(model_dir, {"input": x}, expected)


EXPORTERS: dict[str, Callable[[Path], float]] = {
    "tiny_llama": export_tiny_llama,
    "tiny_bert": export_tiny_bert,
    "tiny_gpt2": export_tiny_gpt2,
    "convnet": export_convnet,
}


def build(name: str, out: Path) -> None:
    """Export one model into a scratch folder under ``out``, check it, then replace ``out/name``."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    scratch.chmod(0o755)  # mkdtemp makes it private; the final folder should be readable like any other
    try:
        diff = EXPORTERS[name](scratch)
        files = sorted(p for p in scratch.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        if total >= MAX_BYTES:
            raise AssertionError(f"{name}: {total} bytes, over the {MAX_BYTES} byte budget")
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    listing = ", ".join(f"{p.name} {p.stat().st_size} B" for p in sorted(target.iterdir()))
    print(f"{name}: {listing}; max |ORT - torch| = {diff:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "models", help="output folder (default: models/)")
    parser.add_argument("--only", nargs="+", choices=list(EXPORTERS), help="export only these models")
    args = parser.parse_args(argv)
    # The dynamo exporter logs one warning per torchvision op it cannot register; torchvision is not needed.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    for name in args.only or EXPORTERS:
        build(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
