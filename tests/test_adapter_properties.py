"""Property tests for the adapter readers on hostile input: .safetensors / .npz / .onnx_adapter files and
PEFT folders that are random bytes, truncated, bit-flipped, or carry lying headers, wrong dtypes and
wrongly typed adapter_config.json values. Every reader either returns tensors or raises
:class:`~lora_onnx.errors.LoraOnnxError`; any other exception fails the test.

Examples are derandomized and few by default (LORA_ONNX_HYPOTHESIS_EXAMPLES raises them).
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rng_array, write_adapter
from hypothesis import example, given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_properties import PROFILE  # one hypothesis profile for the property tests

from lora_onnx.adapters.files import read_adapter_file, write_adapter_file
from lora_onnx.adapters.peft import plan_peft_adapter
from lora_onnx.adapters.peft.tensors import SafetensorsFile
from lora_onnx.errors import LoraOnnxError
from lora_onnx.model.load import load_model

SUFFIXES = (".onnx_adapter", ".safetensors", ".npz")
DTYPES = (np.float32, np.float16, np.float64, np.int64, np.int8, np.uint8, np.bool_)

shapes = st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """1-3 small tensors of assorted dtypes (1+ dims: .onnx_adapter holds no scalars)."""
    names = draw(st.lists(st.text("abcAB._0", min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
    out = {}
    for i, name in enumerate(names):
        dtype = draw(st.sampled_from(DTYPES))
        out[name] = (10 * rng_array(draw(shapes), i)).astype(dtype)
    return out


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` truncated, with bytes overwritten or inserted, or replaced by random bytes."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "random", "same"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "same" or not data:
        return data
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(buffer) - 1))
        if kind == "overwrite":
            buffer[at] = draw(st.integers(0, 255))
        else:
            buffer[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(buffer)


def read_or_refuse(path: Path, format: str | None = None) -> dict[str, np.ndarray] | None:
    """The tensors, or None when the reader refused with a LoraOnnxError (anything else propagates)."""
    try:
        return dict(read_adapter_file(path, format).tensors)
    except LoraOnnxError:
        return None


@PROFILE
@given(data=st.data(), suffix=st.sampled_from(SUFFIXES), content=tensors())
def test_damaged_adapter_files_read_or_raise_lora_onnx_errors(
    data: st.DataObject, suffix: str, content: dict[str, np.ndarray], tmp_path: Path
) -> None:
    try:
        clean = write_adapter_file(content, tmp_path / f"clean{suffix}")
    except LoraOnnxError as exc:  # onnxruntime cannot read bool tensors back: refused on write
        assert suffix == ".onnx_adapter" and "dtype bool" in str(exc)
        content = {name: value for name, value in content.items() if value.dtype != np.bool_}
        clean = write_adapter_file(content, tmp_path / f"clean{suffix}")
    read = read_or_refuse(clean)
    assert read is not None and sorted(read) == sorted(content)  # an intact file reads back exactly
    for name, value in content.items():
        assert read[name].dtype == value.dtype and np.array_equal(read[name], value)
    damaged = tmp_path / f"damaged{suffix}"
    damaged.write_bytes(data.draw(mutated(clean.read_bytes())))
    read_or_refuse(damaged)
    # read by content (an unknown suffix), and read as another format than it is
    other = tmp_path / "damaged.weights"
    other.write_bytes(damaged.read_bytes())
    read_or_refuse(other)
    read_or_refuse(damaged, data.draw(st.sampled_from(["onnx_adapter", "safetensors", "npz"])))


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X9", "")


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A safetensors file whose header may lie: wrong dtypes, shapes, offsets, metadata, header length."""
    header: dict[str, object] = {}
    for name in draw(st.lists(st.text("abc.", min_size=1, max_size=6), max_size=3, unique=True)):
        entry = {
            "dtype": draw(st.sampled_from(SAFETENSORS_DTYPES) | json_values),
            "shape": draw(st.lists(st.integers(-2, 2**40), max_size=3) | json_values),
            "data_offsets": draw(st.lists(st.integers(-1, 2**40), min_size=0, max_size=3) | json_values),
        }
        header[name] = draw(st.just(entry) | json_values)
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    text = json.dumps(header).encode()
    length = draw(st.sampled_from([len(text), len(text) + 1, max(len(text) - 1, 0), 2**63, 0]))
    payload = draw(st.binary(max_size=64))
    return struct.pack("<Q", length % 2**64) + text + payload


@PROFILE
@given(content=safetensors_bytes())
def test_safetensors_with_lying_headers_read_or_raise(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(content)
    read_or_refuse(path)
    try:
        weights = SafetensorsFile(path)  # the PEFT reader: header first, then each tensor
    except LoraOnnxError:
        return
    for key in weights:
        with contextlib.suppress(LoraOnnxError):
            weights.read(key)


@st.composite
def npz_bytes(draw: st.DrawFn) -> bytes:
    """A zip of .npy members whose headers may lie (descr, shape, fortran_order, version, size)."""
    buffer = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for i in range(draw(st.integers(0, 3))):
            descr = draw(st.sampled_from(["<f4", "<f2", "|b1", "<i8", "|O", "<U3", "[('a', '<f4')]", "zz"]))
            shape = draw(st.lists(st.integers(-1, 2**31), max_size=3).map(tuple) | st.just((2, 2)))
            order = draw(st.sampled_from(["False", "True", "1", "None"]))
            dictionary = f"{{'descr': {descr!r}, 'fortran_order': {order}, 'shape': {shape!r}, }}"
            if draw(st.booleans()):
                dictionary = draw(st.text(max_size=40))
            header = dictionary.encode("latin1", "replace")
            version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x00"]))
            size = struct.pack("<H" if version == b"\x01\x00" else "<I", len(header) % 2**16)
            body = b"\x93NUMPY" + version + size + header + draw(st.binary(max_size=64))
            archive.writestr(f"t{i}.npy", body)
    return buffer.getvalue()


@PROFILE
@given(content=npz_bytes())
def test_npz_with_lying_npy_headers_read_or_raise(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    path.write_bytes(content)
    read_or_refuse(path)


def _peft_model() -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/enc/q/MatMul")
    return make_model([node], {"x": (TensorProto.FLOAT, [2, 8])}, ["y"], {"W": rng_array((8, 6))})


GOOD = {"enc.q.lora_A.weight": rng_array((2, 8), 1), "enc.q.lora_B.weight": rng_array((6, 2), 2)}
CONFIG_KEYS = (
    "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern",
    "bias", "modules_to_save", "init_lora_weights", "target_modules", "loftq_config", "layer_replication",
)  # fmt: skip


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("peft_model") / "model.onnx"
    onnx.save(_peft_model(), path)
    return load_model(path)


def plan_or_refuse(model: object, folder: Path) -> bool:
    """True when the adapter was planned, False when refused with a LoraOnnxError."""
    try:
        plan_peft_adapter(model, folder)  # type: ignore[arg-type]
    except LoraOnnxError:
        return False
    return True


@PROFILE
@given(overrides=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4))
@example(overrides={"modules_to_save": 5})  # once a TypeError from list(5)
@example(overrides={"modules_to_save": [1]})
@example(overrides={"lora_alpha": float("nan"), "r": 2.5})
def test_peft_configs_with_wrong_types_plan_or_raise(
    overrides: dict, peft_model: object, tmp_path: Path
) -> None:
    folder = write_adapter(tmp_path / "a", GOOD)
    assert plan_or_refuse(peft_model, folder)  # the clean adapter applies
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **overrides}))
    plan_or_refuse(peft_model, folder)


@PROFILE
@given(data=st.data(), which=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
def test_damaged_peft_folders_plan_or_raise(
    data: st.DataObject, which: str, peft_model: object, tmp_path: Path
) -> None:
    folder = write_adapter(tmp_path / "a", GOOD)
    file = folder / which
    file.write_bytes(data.draw(mutated(file.read_bytes())))
    plan_or_refuse(peft_model, folder)


def test_deeply_nested_config_and_huge_npy_shapes_are_refused(peft_model: object, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a", GOOD)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert not plan_or_refuse(peft_model, folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # a 100-byte member claiming 2**40 float32 values
        header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }"
        archive.writestr("t.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 32)
    (tmp_path / "huge.npz").write_bytes(buffer.getvalue())
    assert read_or_refuse(tmp_path / "huge.npz") is None
