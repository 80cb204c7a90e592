"""Tiny models built inline, onnxruntime runners and numpy references shared by the tests."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
BUNDLED = ("tiny_llama", "tiny_bert", "tiny_gpt2", "convnet")


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, tuple[int, Sequence[int | str]]],
    outputs: Sequence[str],
    initializers: Mapping[str, np.ndarray],
    *,
    opset: int = 17,
) -> onnx.ModelProto:
    """A checked model; ``inputs`` maps name -> (elem type, shape); outputs get their types inferred."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(name, etype, shape) for name, (etype, shape) in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for out, info in zip(model.graph.output, inferred.graph.output, strict=True):
        out.type.CopyFrom(info.type)
    onnx.checker.check_model(model)
    return model


def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str | Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, dict(feeds))


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max|a - e| / max|e| (norm-wise relative error)."""
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()) / scale


def rng_array(shape: Sequence[int], seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(dtype)


def conv_reference(
    x: np.ndarray,
    w: np.ndarray,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
) -> np.ndarray:
    """N-d grouped convolution in float64 numpy, written from the ONNX Conv definition."""
    spatial = x.ndim - 2
    strides = list(strides or [1] * spatial)
    dilations = list(dilations or [1] * spatial)
    kernel = w.shape[2:]
    in_sizes = x.shape[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
            out = math.ceil(size / s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else large)
            pads_end.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        pads_begin, pads_end = [0] * spatial, [0] * spatial
    else:
        flat = list(pads or [0] * 2 * spatial)
        pads_begin, pads_end = flat[:spatial], flat[spatial:]
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *zip(pads_begin, pads_end, strict=True)])
    out_sizes = [
        (xp.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(spatial)
    ]
    n, c = x.shape[:2]
    out_channels = w.shape[0]
    cg, og = c // group, out_channels // group
    result = np.zeros((n, out_channels, *out_sizes))
    for offsets in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(
                offsets[i] * dilations[i], offsets[i] * dilations[i] + out_sizes[i] * strides[i], strides[i]
            )
            for i in range(spatial)
        )
        patch = xp[(slice(None), slice(None), *window)]
        for g in range(group):
            wg = w[(slice(g * og, (g + 1) * og), slice(None), *offsets)].astype(np.float64)
            xg = patch[:, g * cg : (g + 1) * cg]
            result[:, g * og : (g + 1) * og] += np.einsum("oc,nc...->no...", wg, xg)
    return result


def write_adapter(folder: Path, tensors: Mapping[str, np.ndarray], **config: object) -> Path:
    """A PEFT adapter folder written without torch: adapter_model.safetensors (by the safetensors library)
    and adapter_config.json (PEFT's LORA defaults, overridden by ``config``)."""
    import json

    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    defaults: dict[str, object] = {
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False, "use_dora": False,
        "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "target_modules": None,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps({**defaults, **config}))
    return folder
