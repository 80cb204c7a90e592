"""Validation: the comparison rule, inputs, and providers that must be really in use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from builders import MODELS, make_model, rng_array
from onnx import TensorProto, helper

from lora_onnx import validate
from lora_onnx.errors import LoraOnnxError, ProviderError
from lora_onnx.proofs.inputs import InputSpec, make_inputs, parse_dims
from lora_onnx.proofs.validation import compare, create_session


def _linear(path: Path, scale: float = 1.0) -> Path:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model(
        [node], {"x": (TensorProto.FLOAT, ["batch", 4])}, ["y"], {"W": scale * rng_array((4, 3))}
    )
    path.write_bytes(model.SerializeToString())
    return path


def test_compare_rule_is_normwise_with_dtype_defaults() -> None:
    ref = np.array([100.0, 1e-6], np.float32)
    ok = compare(ref, ref + np.float32(5e-3), name="y", provider="cpu", rtol=None, atol=None)
    assert ok.ok and ok.rtol == 1e-4 and ok.max_rel == pytest.approx(5e-5, rel=1e-2)
    bad = compare(ref, ref * 1.01, name="y", provider="cpu", rtol=None, atol=None)
    assert not bad.ok
    assert compare(ref, ref * 1.01, name="y", provider="cpu", rtol={"y": 0.02}, atol=None).ok
    assert not compare(ref, ref[:1], name="y", provider="cpu", rtol=None, atol=None).ok
    nan = np.array([np.nan, 1.0], np.float32)
    # NaN is never agreement (issue 10): a non-finite reference fails unless the user opts in
    assert not compare(nan, nan.copy(), name="y", provider="cpu", rtol=None, atol=None).ok
    assert compare(nan, nan.copy(), name="y", provider="cpu", rtol=None, atol=None, allow_nonfinite=True).ok
    assert not compare(nan, np.ones(2, np.float32), name="y", provider="cpu", rtol=None, atol=None).ok
    ints = np.array([1, 2], np.int64)
    assert not compare(ints, ints + 1, name="y", provider="cpu", rtol=None, atol=None).ok


def test_validate_reports_agreement_and_disagreement(tmp_path: Path) -> None:
    a, b = _linear(tmp_path / "a.onnx"), _linear(tmp_path / "b.onnx", scale=1.5)
    same = validate(a, a, dims={"batch": 5})
    assert same.ok and same.input_shapes == {"x": (5, 4)}
    differ = validate(a, b)
    assert not differ.ok and differ.failures[0].name == "y"
    assert differ.to_json()["outputs"][0]["ok"] is False


def test_inputs_from_npz_must_name_every_input(tmp_path: Path) -> None:
    a = _linear(tmp_path / "a.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((3, 4), np.float32))
    assert validate(a, a, inputs=tmp_path / "in.npz").input_shapes == {"x": (3, 4)}
    np.savez(tmp_path / "wrong.npz", z=np.ones((3, 4), np.float32))
    with pytest.raises(LoraOnnxError, match="has no array 'x'"):
        validate(a, a, inputs=tmp_path / "wrong.npz")


def test_generated_inputs_keep_ids_in_range_and_masks_on() -> None:
    specs = [
        InputSpec("input_ids", "tensor(int64)", ("batch", "sequence")),
        InputSpec("attention_mask", "tensor(int64)", ("batch", "sequence")),
        InputSpec("pixel", "tensor(float)", (None, 3, 4, 4)),
    ]
    feeds = make_inputs(specs, parse_dims(["sequence=5"]))
    assert (
        feeds["input_ids"].shape == (2, 5) and feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 16
    )
    assert np.all(feeds["attention_mask"] == 1) and feeds["pixel"].shape == (2, 3, 4, 4)
    with pytest.raises(LoraOnnxError, match="--dim takes NAME=VALUE"):
        parse_dims(["batch"])


def test_cuda_requested_but_missing_is_an_error_not_a_cpu_run(tmp_path: Path, monkeypatch) -> None:
    a = _linear(tmp_path / "a.onnx")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(
        ProviderError, match=r"CUDAExecutionProvider was requested but .* only has CPUExecutionProvider"
    ):
        validate(a, a, providers="cuda")


def test_silent_fallback_to_cpu_is_detected(tmp_path: Path, monkeypatch) -> None:
    a = _linear(tmp_path / "a.onnx")
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*available, "CUDAExecutionProvider"])
    real = ort.InferenceSession

    class FallingBack(real):  # what onnxruntime does when CUDA cannot start: run on the CPU, warn
        def __init__(self, path, options, providers):
            super().__init__(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", FallingBack)
    with pytest.raises(ProviderError, match="fell back to CPUExecutionProvider"):
        create_session(a, "CUDAExecutionProvider")


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="onnxruntime-gpu / CUDA not installed",
)
def test_cuda_validation_on_a_bundled_model() -> None:
    model = MODELS / "tiny_bert" / "model.onnx"
    report = validate(model, model, providers="cpu,cuda")
    assert report.ok and {c.provider for c in report.comparisons} == {
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
    }


def test_unknown_provider_and_unloadable_model(tmp_path: Path) -> None:
    a = _linear(tmp_path / "a.onnx")
    with pytest.raises(LoraOnnxError, match="unknown provider 'tpu'"):
        validate(a, a, providers="tpu")
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="f", domain="example.custom")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    custom = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    (tmp_path / "custom.onnx").write_bytes(custom.SerializeToString())
    with pytest.raises(LoraOnnxError, match=r"onnxruntime cannot load .*custom\.onnx"):
        validate(tmp_path / "custom.onnx", a)
    assert rng_array((1,)).shape == (1,)
