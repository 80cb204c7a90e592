"""Small models and file helpers shared by the batch, report and robustness tests."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
BUNDLED = ("convnet", "tiny_bert", "tiny_gpt2", "tiny_llama")


def dense_model(seed: int = 0, *, hidden: int = 8) -> onnx.ModelProto:
    """x -> MatMul(fc1) -> Relu -> Gemm(fc2, transB=1) -> y: two sites, nothing skipped."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "fc1.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((4, hidden)).astype(np.float32), "fc2.weight")
    b2 = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "fc2.bias")
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w1, w2, b2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save(model: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    """Save with onnx (external data in ``<name>.data`` when asked, even for small tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(
            model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
        )
    else:
        onnx.save_model(model, path)
    return path


def no_site_model() -> onnx.ModelProto:
    """Only a MatMul of two graph inputs (no constant weight) and a Relu: nothing can take a branch."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="dynamic_mm"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "no_site",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def custom_op_model() -> onnx.ModelProto:
    """A MatMul site followed by an op of a domain onnxruntime does not know."""
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "fc.weight")
    nodes = [
        helper.make_node("MatMul", ["x", "fc.weight"], ["h"], name="fc"),
        helper.make_node("Frobnicate", ["h"], ["y"], name="frob", domain="com.example"),
    ]
    graph = helper.make_graph(
        nodes,
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [weight],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def copy_bundled(dest: Path, names: tuple[str, ...] = BUNDLED) -> Path:
    """Copies of bundled models (never the repository's own files: outputs hard-link their data)."""
    for name in names:
        shutil.copytree(MODELS / name, dest / name)
    return dest


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (to prove inputs were not modified)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def files_under(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden temp files included), relative; [] when it does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def cli(*args: str | os.PathLike, env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``python -m lora_onnx ARGS`` with this checkout first on the path."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lora_onnx", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def chaotic_model() -> onnx.ModelProto:
    """dense_model followed by sin(1e7 * y): the last-bit rounding differences between a LoRA branch and
    its fold become O(1) output differences, so proving a random-init rewrite fails, deterministically."""
    model = dense_model()
    graph = model.graph
    graph.output[0].name = "chaotic"
    graph.initializer.append(numpy_helper.from_array(np.array(1e7, np.float32), "gain"))
    graph.node.append(helper.make_node("Mul", ["y", "gain"], ["amplified"], name="amplify"))
    graph.node.append(helper.make_node("Sin", ["amplified"], ["chaotic"], name="sin"))
    return model
