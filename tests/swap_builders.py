"""Shared pieces of the run-time adapter (slot) tests: a mixed tiny model and onnxruntime adapter runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from builders import make_model, rng_array
from onnx import TensorProto, helper

F = TensorProto.FLOAT


def mixed_model() -> onnx.ModelProto:
    """MatMul + bias, Gemm transB=1 (alpha 0.5) behind a Transpose, Gemm transA=1, an fp16 weight behind
    a Cast, and a grouped, padded conv: every kind of site a slot must handle."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["mm"], name="/fc1/MatMul"),
        helper.make_node("Add", ["mm", "b1"], ["h"], name="/fc1/Add"),
        helper.make_node("Transpose", ["W2"], ["W2t"], name="W2_T", perm=[1, 0]),
        helper.make_node("Gemm", ["h", "W2t"], ["g"], name="/fc2/Gemm", transB=1, alpha=0.5),
        helper.make_node("Cast", ["W3"], ["W3f"], name="W3_cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["g", "W3f"], ["y"], name="/fc3/MatMul"),
        helper.make_node("Gemm", ["xt", "W4"], ["z"], name="/fc4/Gemm", transA=1),
        helper.make_node("Conv", ["img", "Wc", "bc"], ["c"], name="/conv/Conv", group=2, pads=[1, 1, 1, 1]),
    ]
    inits = {
        "W1": rng_array((8, 16), 1), "b1": rng_array((16,), 2), "W2": rng_array((16, 12), 3),
        "W3": rng_array((12, 6), 4).astype(np.float16), "W4": rng_array((5, 7), 7),
        "Wc": rng_array((6, 2, 3, 3), 5), "bc": rng_array((6,), 6),
    }  # fmt: skip
    inputs = {"x": (F, ["batch", 8]), "xt": (F, [5, "batch"]), "img": (F, ["batch", 4, 5, 5])}
    return make_model(nodes, inputs, ["y", "z", "c"], inits)


def mixed_feeds(batch: int = 3) -> dict[str, np.ndarray]:
    return {
        "x": rng_array((batch, 8), 10),
        "xt": rng_array((5, batch), 12),
        "img": rng_array((batch, 4, 5, 5), 11),
    }


def session(path: str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # slots are initializers that are also inputs: ORT warns about each
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_adapter(path: str | Path) -> ort.LoraAdapter:
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    return adapter


def run_with(
    sess: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *adapters: ort.LoraAdapter,
) -> list[np.ndarray]:
    """One run with ``adapters`` active (none: the slots' empty defaults)."""
    options = ort.RunOptions()
    for adapter in adapters:
        options.add_active_adapter(adapter)
    return sess.run(None, dict(feeds), options)
