"""Test-side harness for PEFT parity: tiny seeded models, base ONNX exports, PEFT adapters, reference outputs.

Nothing here imports ``lora_onnx``: the harness produces what a user would have (a base ONNX export and a
PEFT adapter folder) plus what PEFT itself computes, so tests can judge the library against PEFT.

Entry point: :func:`build_case`. Exports are cached per (arch, exporter, seed) for the session because the
dynamo exporter takes seconds per model on 2 cores.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

ARCHS: tuple[str, ...] = ("llama", "bert", "gpt2", "convnet", "llama_inner", "llama_outer")
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")

_TINY = 1e-30


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max(max|b|, tiny): the relative error of ``a`` against the reference ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), _TINY))


# ----------------------------------------------------------------------------------------------------
# Tiny architectures


class TinyConvNet(nn.Module):
    """Conv1d, strided+padded Conv2d, grouped Conv2d, 1x1 Conv2d, Conv3d and a Linear head on one input."""

    def __init__(self, in_ch: int = 4, ch: int = 8, groups: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(in_ch, ch, kernel_size=3, stride=2, padding=1)
        self.gconv = nn.Conv2d(ch, ch, kernel_size=3, padding=1, groups=groups)
        self.pconv = nn.Conv2d(ch, ch, kernel_size=1)
        self.conv1d = nn.Conv1d(ch, ch, kernel_size=3, padding=1)
        self.conv3d = nn.Conv3d(ch, ch, kernel_size=3, padding=1)
        self.head = nn.Linear(ch, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x))  # (B, ch, H/2, W/2)
        h = torch.relu(self.gconv(h))
        h = self.pconv(h)
        b, c, hh, ww = h.shape
        h = torch.relu(self.conv1d(h.flatten(2)))  # (B, ch, H*W/4)
        h = self.conv3d(h.reshape(b, c, hh, ww).unsqueeze(2))  # (B, ch, 1, H/2, W/2)
        return self.head(h.mean(dim=(2, 3, 4)))


def _llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        initializer_range=0.1,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


def _bert(seed: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=3,
        initializer_range=0.1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg)


def _gpt2(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        use_cache=False,
        initializer_range=0.1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg)


def _convnet(seed: int) -> nn.Module:
    return TinyConvNet()


def _lm_call(fn: Callable[..., Any], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return fn(**inputs, use_cache=False).logits


def _cls_call(fn: Callable[..., Any], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return fn(**inputs).logits


def _hidden_call(fn: Callable[..., Any], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return fn(**inputs, use_cache=False).last_hidden_state


def _plain_call(fn: Callable[..., Any], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return fn(*inputs.values())


@dataclass(frozen=True)
class ArchSpec:
    """How to build, call, export and adapt one tiny architecture.

    export_root / peft_root are dotted attribute paths inside the built model ("" = the model itself): the
    ONNX graph is exported from ``export_root`` and PEFT wraps ``peft_root``, so module paths in the adapter
    and in the graph differ by a dotted prefix when the two roots differ.
    """

    name: str
    build: Callable[[int], nn.Module]
    call: Callable[[Callable[..., Any], Mapping[str, torch.Tensor]], torch.Tensor]
    input_kind: str  # "text", "text3" (ids, mask, token types) or "image"
    output_name: str
    default_targets: tuple[str, ...]
    output_dims: tuple[str, ...] = ("batch", "seq")
    export_root: str = ""
    peft_root: str = ""
    default_fan_in_fan_out: bool = False
    export_alias: str = ""  # another arch whose ONNX export is identical (shared through the export cache)


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCH_SPECS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        "llama": ArchSpec("llama", _llama, _lm_call, "text", "logits", _LLAMA_TARGETS),
        "bert": ArchSpec(
            "bert",
            _bert,
            _cls_call,
            "text3",
            "logits",
            ("query", "key", "value", "dense"),
            output_dims=("batch",),
        ),
        "gpt2": ArchSpec(
            "gpt2",
            _gpt2,
            _lm_call,
            "text",
            "logits",
            ("c_attn", "c_proj", "c_fc"),
            default_fan_in_fan_out=True,
        ),
        "convnet": ArchSpec(
            "convnet",
            _convnet,
            _plain_call,
            "image",
            "output",
            ("conv2d", "pconv", "conv1d", "conv3d", "head"),
            output_dims=("batch",),
        ),
        # Adapter trained on the bare LlamaModel ("layers.0...") applied to an export of LlamaForCausalLM
        # ("model.layers.0..."): the graph's paths carry an extra "model." prefix.
        "llama_inner": ArchSpec(
            "llama_inner",
            _llama,
            _lm_call,
            "text",
            "logits",
            _LLAMA_TARGETS,
            export_root="",
            peft_root="model",
            export_alias="llama",
        ),
        # Adapter trained on LlamaForCausalLM ("model.layers.0...") applied to an export of the bare
        # LlamaModel ("layers.0..."): the adapter's paths carry an extra "model." prefix.
        "llama_outer": ArchSpec(
            "llama_outer",
            _llama,
            _hidden_call,
            "text",
            "last_hidden_state",
            _LLAMA_TARGETS,
            export_root="model",
            peft_root="",
        ),
    }
)


def _get_sub(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path) if path else module


def _randomize_(model: nn.Module, seed: int) -> None:
    """Give every parameter distinct random values (trained models have no all-ones norms or zero biases).

    This also stops the exporters from deduplicating identical initializers (all-ones norm weights, all-zero
    biases) into one shared tensor, which is not what trained checkpoints look like.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim == 1 and name.endswith("weight"):  # every 1-D weight here is a norm scale
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.05 * noise)
            elif any(k in name for k in ("embed", "wte", "wpe")):
                p.copy_(0.5 * noise)
            else:  # Linear/Conv (out, in, ...) and GPT-2 Conv1D (in, out): keep activations O(1)
                p.copy_(noise / math.sqrt(p[0].numel()))


@functools.cache
def _cached_base_model(arch: str, seed: int) -> nn.Module:
    spec = ARCH_SPECS[arch]
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = spec.build(seed)
    _randomize_(model, seed)
    return model.eval()


def base_model(arch: str, seed: int = 0) -> nn.Module:
    """A fresh (deep-copied) tiny model for ``arch`` with seeded random weights, in eval mode."""
    if arch not in ARCH_SPECS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return copy.deepcopy(_cached_base_model(arch, seed))


def make_inputs(arch: str, batch: int = 3, seq: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed inputs named like the ONNX graph inputs. Shapes differ from the export trace on purpose."""
    spec = ARCH_SPECS[arch]
    rng = np.random.default_rng(1000 + seed)
    if spec.input_kind == "image":
        return {"x": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)}
    ids = rng.integers(0, 64, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    out = {"input_ids": ids, "attention_mask": mask}
    if spec.input_kind == "text3":
        mask[-1, -2:] = 0  # padding in the last row: BERT masks are bidirectional, so this is well defined
        tt = np.zeros((batch, seq), dtype=np.int64)
        tt[:, seq // 2 :] = 1
        out["token_type_ids"] = tt
    return out


def torch_output(arch: str, model: nn.Module, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Run ``model`` (a full ``arch`` model, maybe with LoRA injected) the way its ONNX graph does."""
    spec = ARCH_SPECS[arch]
    feeds = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return spec.call(_get_sub(model, spec.export_root), feeds).detach().numpy().copy()


# ----------------------------------------------------------------------------------------------------
# Base export


@dataclass(frozen=True)
class BaseExport:
    """One exported base model (no LoRA)."""

    arch: str
    exporter: str
    seed: int
    onnx_path: Path
    input_names: tuple[str, ...]
    output_name: str
    export_seconds: float


def _export(arch: str, exporter: str, seed: int, out_dir: Path) -> BaseExport:
    spec = ARCH_SPECS[arch]
    host = base_model(arch, seed)
    module = _get_sub(host, spec.export_root)
    trace_inputs = make_inputs(arch, batch=2, seq=7, seed=seed + 7)
    names = tuple(trace_inputs)
    orig_forward = module.forward

    # Patch forward on the instance (as Optimum's model patcher does) rather than wrapping the module, so the
    # exported scopes and parameter names keep the model's own module paths.
    def forward(*args: torch.Tensor) -> torch.Tensor:
        return spec.call(orig_forward, dict(zip(names, args, strict=True)))

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    module.forward = forward
    args = tuple(torch.from_numpy(v) for v in trace_inputs.values())
    dims = {0: "batch"} if spec.input_kind == "image" else {0: "batch", 1: "seq"}
    out_dims = dict(enumerate(spec.output_dims))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    kwargs: dict[str, Any] = {"input_names": list(names), "output_names": [spec.output_name]}
    if exporter == "torchscript":
        kwargs["dynamic_axes"] = {**{n: dims for n in names}, spec.output_name: out_dims}
        kwargs["dynamo"] = False
    elif exporter == "dynamo":
        tdims = {k: torch.export.Dim(v, min=1, max=64) for k, v in dims.items()}
        kwargs["dynamic_shapes"] = {n: tdims for n in names}
        kwargs["dynamo"] = True
    else:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    start = time.perf_counter()
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), **kwargs)
    seconds = time.perf_counter() - start
    return BaseExport(arch, exporter, seed, path, names, spec.output_name, seconds)


_EXPORTS: dict[tuple[str, str, int], BaseExport] = {}
# A folder shared by every process of one test run (xdist workers; set by tests/conftest.py). The first
# process to need an (arch, exporter, seed) exports it there under a file lock and records it in
# ``export.json``; the others reuse that file instead of exporting again (seconds per dynamo export).
SHARED_EXPORTS_ENV = "PEFT_CASES_SHARED_EXPORTS"


def _shared_export(arch: str, exporter: str, seed: int, folder: Path) -> BaseExport:
    from filelock import FileLock  # a dependency of torch, transformers and huggingface_hub

    record = folder / "export.json"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not record.exists():
            exp = _export(arch, exporter, seed, folder)
            names = {"input_names": list(exp.input_names), "output_name": exp.output_name}
            record.write_text(json.dumps({**names, "export_seconds": exp.export_seconds}))
            return exp
        saved = json.loads(record.read_text())
    return BaseExport(
        arch,
        exporter,
        seed,
        folder / "model.onnx",
        tuple(saved["input_names"]),
        saved["output_name"],
        saved["export_seconds"],
    )


def export_base(arch: str, exporter: str, out_dir: Path, seed: int = 0) -> BaseExport:
    """Export the base ``arch`` model with ``exporter`` into ``out_dir/<arch>_<exporter>_s<seed>/``.

    Cached for the process: a later call with the same (arch, exporter, seed) returns the first export
    (wherever it was written) as long as its file still exists. Archs with an ``export_alias`` share it.
    With ``$PEFT_CASES_SHARED_EXPORTS`` set, the export lives in (and is reused from) that folder instead.
    """
    if arch not in ARCH_SPECS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    arch = ARCH_SPECS[arch].export_alias or arch
    key = (arch, exporter, seed)
    cached = _EXPORTS.get(key)
    if cached is not None and cached.onnx_path.exists():
        return cached
    name = f"{arch}_{exporter}_s{seed}"
    shared = os.environ.get(SHARED_EXPORTS_ENV)
    if shared:
        exp = _shared_export(arch, exporter, seed, Path(shared) / name)
    else:
        exp = _export(arch, exporter, seed, Path(out_dir) / name)
    _EXPORTS[key] = exp
    return exp


def export_timings() -> dict[tuple[str, str, int], float]:
    """Seconds each cached export took."""
    return {k: v.export_seconds for k, v in _EXPORTS.items()}


def run_onnx(onnx_path: Path, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model in onnxruntime on CPU (explicit provider)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(inputs))


# ----------------------------------------------------------------------------------------------------
# PEFT adapters


@dataclass(frozen=True)
class PeftCase:
    """A base ONNX export, a saved PEFT adapter for the same weights, and PEFT's own outputs on ``inputs``.

    ``merged_output`` is None when PEFT itself cannot merge (e.g. grouped convs); ``merge_error`` says why.
    Root mismatch (at most one is non-empty): ``graph_only_prefix`` is what graph module paths have in front
    of the adapter's (graph "model.layers.0.x" vs adapter "layers.0.x" -> "model");
    ``adapter_only_prefix`` is the reverse (adapter "model.layers.0.x" vs graph "layers.0.x" -> "model").
    """

    arch: str
    exporter: str
    onnx_path: Path
    adapter_dir: Path
    inputs: Mapping[str, np.ndarray]
    base_output: np.ndarray
    peft_output: np.ndarray
    merged_output: np.ndarray | None
    lora_config: LoraConfig
    merge_error: str | None = None
    graph_only_prefix: str = ""
    adapter_only_prefix: str = ""
    build_seconds: float = 0.0
    export_seconds: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)


def default_features(arch: str) -> dict[str, Any]:
    """LoraConfig kwargs every case starts from: non-zero A and B, the arch's usual targets."""
    spec = ARCH_SPECS[arch]
    return {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "init_lora_weights": False,
        "target_modules": list(spec.default_targets),
        "fan_in_fan_out": spec.default_fan_in_fan_out,
    }


_LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 4},
    "patterns": {
        "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 8},
        "alpha_pattern": {"v_proj": 3, r"layers\.0\.mlp\..*": 32},
    },
    "dora": {"use_dora": True},
    "dora_patterns": {"use_dora": True, "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"up_proj": 12}},
    "regex": {"target_modules": r".*layers\.1\.self_attn\.(q_proj|v_proj)"},
    "exclude_list": {"exclude_modules": ["gate_proj", "layers.0.self_attn.k_proj"]},
    "exclude_regex": {"exclude_modules": r".*layers\.0\..*"},
    "embedding": {"target_modules": [*_LLAMA_TARGETS, "embed_tokens"]},
    "dora_embedding": {"use_dora": True, "target_modules": ["embed_tokens", "q_proj"]},
}

# Named LoraConfig kwargs per arch, merged over default_features(arch). Keys are stable for test ids.
FEATURE_PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "llama": {**_LLAMA_PRESETS, "lm_head": {"target_modules": ["q_proj", "lm_head"]}},
        "llama_inner": dict(_LLAMA_PRESETS),
        # "lm_head" has no site in this graph (the export is the bare LlamaModel): an import must fail loudly.
        "llama_outer": {**_LLAMA_PRESETS, "lm_head_missing": {"target_modules": ["q_proj", "lm_head"]}},
        "bert": {
            "plain": {},
            "rslora": {"use_rslora": True},
            "dora": {"use_dora": True},
            "lora_bias": {"lora_bias": True},
            "gemm": {"target_modules": ["query", "pooler.dense", "classifier"]},
            "dora_gemm": {"use_dora": True, "target_modules": ["pooler.dense", "classifier"]},
            "embedding": {"target_modules": ["value", "word_embeddings", "token_type_embeddings"]},
            "regex": {"target_modules": r"bert\.encoder\.layer\.\d\.attention\.self\.(query|value)"},
            "patterns": {"rank_pattern": {"query": 8, "intermediate.dense": 2}, "alpha_pattern": {"key": 1}},
        },
        "gpt2": {
            "plain": {},
            "rslora": {"use_rslora": True},
            "dora": {"use_dora": True},
            "lora_bias": {"lora_bias": True},
            "patterns": {
                "rank_pattern": {"c_attn": 8, r"h\.1\.mlp\.c_proj": 2},
                "alpha_pattern": {"c_fc": 2},
            },
            # wte is tied to lm_head: PEFT's forward adapts only the lookup; merging edits the shared weight.
            "embedding_tied": {"target_modules": ["c_attn", "wte"]},
            "embedding_pos": {"target_modules": ["c_fc", "wpe"]},
        },
        "convnet": {
            "plain": {},
            "rslora": {"use_rslora": True, "r": 6, "lora_alpha": 3},
            "patterns": {"rank_pattern": {"conv3d": 2, "pconv": 6}, "alpha_pattern": {"conv1d": 16}},
            "grouped": {"target_modules": ["gconv", "conv2d"]},  # r % groups == 0; PEFT cannot merge it
            "dora": {"use_dora": True},
            # PEFT runs DoRA on a grouped conv, but its weight norm reshapes B.view(-1, r) @ A.view(r, -1)
            # into the grouped weight's shape, which is not the branch's real delta: mimic it or decline.
            "dora_grouped": {"use_dora": True, "target_modules": ["gconv"]},
            "lora_bias": {"lora_bias": True},
            "regex": {"target_modules": r"conv\dd|head"},
        },
    }
)


def preset_cases() -> list[tuple[str, str]]:
    """Every (arch, preset name) pair, for parametrizing a suite."""
    return [(arch, name) for arch, presets in FEATURE_PRESETS.items() for name in presets]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _perturb_dora_magnitudes_(model: nn.Module, seed: int) -> int:
    """Scale DoRA magnitudes by factors in [0.5, 1.5].

    PEFT initialises m = ||W + s*B@A|| row-wise, so a fresh DoRA adapter equals plain LoRA; perturbing m makes
    tests able to tell the two apart.
    """
    gen = torch.Generator().manual_seed(seed + 2)
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
                count += 1
    return count


def build_case(
    arch: str,
    exporter: str,
    features: Mapping[str, Any] | LoraConfig | str | None,
    workdir: Path,
    seed: int = 0,
    export_dir: Path | None = None,
) -> PeftCase:
    """Build one parity case: base export (cached), PEFT adapter saved in ``workdir/adapter``, references.

    ``features`` are LoraConfig kwargs merged over :func:`default_features`, or the name of a preset in
    ``FEATURE_PRESETS[arch]``; a LoraConfig is used as is.
    The export goes to ``export_dir`` (default ``workdir``) unless already cached for (arch, exporter, seed).
    """
    start = time.perf_counter()
    spec = ARCH_SPECS[arch]
    workdir = Path(workdir)
    exp = export_base(arch, exporter, export_dir or workdir, seed)
    if isinstance(features, str):
        features = FEATURE_PRESETS[arch][features]
    if isinstance(features, LoraConfig):
        config = copy.deepcopy(features)
    else:
        config = LoraConfig(**{**default_features(arch), **dict(features or {})})

    inputs = make_inputs(arch, seed=seed)
    host = base_model(arch, seed)
    base_out = torch_output(arch, host, inputs)

    # LoRA A/B inits draw from the global generator: seed it, but only inside a forked RNG state.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed + 3)
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_get_sub(host, spec.peft_root), copy.deepcopy(config))
    peft_model.eval()
    n_dora = _perturb_dora_magnitudes_(peft_model, seed)
    # get_peft_model injects LoRA layers into ``host`` in place, so calling host runs PEFT's forward.
    peft_out = torch_output(arch, host, inputs)

    adapter_dir = workdir / "adapter"
    with warnings.catch_warnings():
        # PEFT 0.21.2 warns about every 1-D lora_B.bias ("invalid shape") and about saving embedding layers.
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(adapter_dir))

    merged_out: np.ndarray | None = None
    merge_error: str | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_root = peft_model.merge_and_unload()
        # merge_and_unload returns the (now plain) PEFT root; put it back in case it is a new object.
        if spec.peft_root:
            parent, _, attr = spec.peft_root.rpartition(".")
            setattr(_get_sub(host, parent), attr, merged_root)
        else:
            host = merged_root
        merged_out = torch_output(arch, host, inputs)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        merge_error = f"{type(e).__name__}: {e}"

    graph_only = adapter_only = ""
    if spec.peft_root and not spec.export_root:
        graph_only = spec.peft_root
    elif spec.export_root and not spec.peft_root:
        adapter_only = spec.export_root

    return PeftCase(
        arch=arch,
        exporter=exporter,
        onnx_path=exp.onnx_path,
        adapter_dir=adapter_dir,
        inputs=MappingProxyType({k: _readonly(v) for k, v in inputs.items()}),
        base_output=_readonly(base_out),
        peft_output=_readonly(peft_out),
        merged_output=None if merged_out is None else _readonly(merged_out),
        lora_config=config,
        merge_error=merge_error,
        graph_only_prefix=graph_only,
        adapter_only_prefix=adapter_only,
        build_seconds=time.perf_counter() - start,
        export_seconds=exp.export_seconds,
        extra=MappingProxyType({"dora_magnitudes_perturbed": n_dora}),
    )


def adapter_config(case: PeftCase) -> dict[str, Any]:
    """The saved adapter_config.json as a dict."""
    return json.loads((case.adapter_dir / "adapter_config.json").read_text())


def adapter_tensors(case: PeftCase) -> dict[str, np.ndarray]:
    """The saved adapter_model.safetensors as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(case.adapter_dir / "adapter_model.safetensors"))
