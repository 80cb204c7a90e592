"""Tiny random diffusers UNet2DConditionModel / transformers CLIPTextModel, their ONNX exports, and LoRA
files made with diffusers / PEFT themselves (test side: nothing here imports ``lora_onnx``).

Exports use the TorchScript exporter (``dynamo=False``), whose node scopes keep the module paths
(``/down_blocks.0/attentions.0/.../to_q/MatMul``); each model is exported once per process.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

CROSS_DIM = 16
SEQ = 5


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """Two down / up blocks (one with cross attention), 8 x 8 latents, 4 channels: about 60k parameters."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return unet.eval()


def tiny_clip(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=CROSS_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=SEQ,
    )
    return CLIPTextModel(config).eval()


def unet_inputs(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([3.0, 7.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, SEQ, CROSS_DIM)).astype(np.float32),
    }


def clip_inputs(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 50, size=(2, SEQ)).astype(np.int64)}


def torch_unet_output(unet: UNet2DConditionModel, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
        return unet(**feeds, return_dict=False)[0].numpy()


def torch_clip_output(clip: CLIPTextModel, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return clip(torch.from_numpy(inputs["input_ids"]), return_dict=False)[0].numpy()


@dataclass(frozen=True)
class Export:
    path: Path
    output: str


def export_unet(unet: UNet2DConditionModel, folder: Path) -> Export:
    """``folder/model.onnx`` of ``unet`` (TorchScript exporter, fixed shapes)."""
    inputs = unet_inputs()
    args = tuple(torch.from_numpy(v) for v in inputs.values())

    forward = unet.forward
    unet.forward = lambda sample, timestep, encoder_hidden_states: forward(  # type: ignore[method-assign]
        sample, timestep, encoder_hidden_states, return_dict=False
    )[0]
    try:
        return _export(unet, args, list(inputs), folder)
    finally:
        del unet.forward


def export_clip(clip: CLIPTextModel, folder: Path) -> Export:
    inputs = clip_inputs()
    forward = clip.forward
    clip.forward = lambda input_ids: forward(input_ids, return_dict=False)[0]  # type: ignore[method-assign]
    try:
        return _export(clip, (torch.from_numpy(inputs["input_ids"]),), ["input_ids"], folder)
    finally:
        del clip.forward


def _export(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str], folder: Path
) -> Export:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"], dynamo=False)
    return Export(path, "out")


def run(path: Path, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in inputs.items() if k in wanted})[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


# ----------------------------------------------------------------------------------------------------
# LoRA files, made with PEFT / diffusers, and diffusers' own forward with them

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2")
#: LoCon: the resnets' 3 x 3 convs and the 1 x 1 shortcut.
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def peft_lora(
    model: torch.nn.Module, targets: tuple[str, ...], *, rank: int, alpha: float, seed: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """A trained-looking LoRA for ``model`` (PEFT keys relative to it, config dict): A and B random."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    host = copy.deepcopy(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, host)  # what diffusers' add_adapter does (transformers' needs peft 0.22)
    with torch.no_grad():  # B ~ 0.3 * N(0, 1), so the adapter's effect is clearly visible
        for name, param in host.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn_like(param))
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(host).items()}
    return state, config.to_dict()


def save_diffusers(
    folder: Path,
    *,
    unet: dict[str, torch.Tensor] | None = None,
    text_encoder: dict[str, torch.Tensor] | None = None,
    unet_config: dict | None = None,
    text_encoder_config: dict | None = None,
) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` written by diffusers' ``save_lora_weights``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder),
        unet_lora_layers=unet,
        text_encoder_lora_layers=text_encoder,
        unet_lora_adapter_metadata=unet_config,
        text_encoder_lora_adapter_metadata=text_encoder_config,
    )
    return folder / "pytorch_lora_weights.safetensors"


def save_kohya(
    path: Path,
    components: Mapping[str, dict[str, torch.Tensor]],
    alphas: Mapping[str, float] | None = None,
    *,
    sdxl: bool = False,
) -> Path:
    """The kohya layout of PEFT state dicts (component -> state dict), written by hand: ``lora_unet_`` /
    ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` with ``sdxl``) + the module path with '_' for '.', and a
    float ``.alpha`` per module (``alphas[component]``, else the rank)."""
    import safetensors.torch

    prefixes = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1" if sdxl else "lora_te",
        "text_encoder_2": "lora_te2",
    }
    out: dict[str, torch.Tensor] = {}
    for component, state in components.items():
        for key, value in state.items():
            module, role = key.rsplit(".lora_", 1)
            name = f"{prefixes[component]}_{module.replace('.', '_')}"
            out[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = value
            if role.startswith("A"):
                alpha = (alphas or {}).get(component, float(value.shape[0]))
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
    safetensors.torch.save_file(out, str(path))
    return path


def diffusers_unet(unet: UNet2DConditionModel, loras: list[tuple[Path, float]], *, fuse: bool = False):
    """A copy of ``unet`` with each LoRA file loaded by diffusers (``lora_state_dict`` converts kohya
    files) at its strength (``set_adapters``), fused into the weights with ``fuse``."""
    import copy

    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    host = copy.deepcopy(unet)
    names = []
    for i, (path, _) in enumerate(loras):
        state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
        Loader.load_lora_into_unet(state, alphas, host, adapter_name=f"a{i}", metadata=metadata)
        names.append(f"a{i}")
    host.set_adapters(names, weights=[strength for _, strength in loras])
    if fuse:
        host.fuse_lora(adapter_names=names)
        host.unload_lora() if hasattr(host, "unload_lora") else None
    return host


def diffusers_clip(clip: CLIPTextModel, path: Path, strength: float = 1.0, component: str = "text_encoder"):
    import copy

    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    host = copy.deepcopy(clip)
    state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    Loader.load_lora_into_text_encoder(
        state, alphas, host, prefix=component, adapter_name="a0", metadata=metadata
    )
    set_adapters_for_text_encoder(["a0"], host, [strength])
    return host


_EXPORTS: dict[str, tuple[torch.nn.Module, Export]] = {}


def shared_export(kind: str) -> tuple[torch.nn.Module, Export]:
    """The tiny ``unet`` or ``clip`` and its export, made once per process (in a temporary folder)."""
    import tempfile

    if kind not in _EXPORTS or not _EXPORTS[kind][1].path.exists():
        folder = Path(tempfile.mkdtemp(prefix=f"sd_{kind}_"))
        if kind == "unet":
            model: torch.nn.Module = tiny_unet()
            _EXPORTS[kind] = (model, export_unet(model, folder))  # type: ignore[arg-type]
        else:
            model = tiny_clip()
            _EXPORTS[kind] = (model, export_clip(model, folder))  # type: ignore[arg-type]
    return _EXPORTS[kind]


def old_diffusers_layout(state: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """A PEFT state dict in diffusers' older layout: attention projections as processor keys
    (``attn1.processor.to_q_lora.down.weight``), everything else ``<path>.lora.down.weight``."""
    processor = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
    out = {}
    for key, value in state.items():
        module, role = key.rsplit(".lora_", 1)
        direction = "down" if role.startswith("A") else "up"
        for name, short in processor.items():
            if module.endswith("." + name) and ".attn" in module:
                base = module[: -len(name) - 1]
                out[f"{component}.{base}.processor.{short}_lora.{direction}.weight"] = value
                break
        else:
            out[f"{component}.{module}.lora.{direction}.weight"] = value
    return out
