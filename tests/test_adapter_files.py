"""Adapter files: three formats round-trip; .onnx_adapter loads in onnxruntime; bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lora_onnx.adapters.files import format_for, read_adapter_file, write_adapter_file
from lora_onnx.errors import AdapterError, OutputError

TENSORS = {
    "m.lora_A.weight": np.arange(12, dtype=np.float32).reshape(4, 3),
    "m.lora_B.weight": np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5),
    "half.lora_A.weight": np.ones((2, 2), np.float16),
    "empty.lora_A.weight": np.zeros((4, 0), np.float32),
}


@pytest.mark.parametrize("suffix", [".onnx_adapter", ".safetensors", ".npz"])
def test_round_trip_keeps_names_shapes_dtypes_and_values(suffix: str, tmp_path: Path) -> None:
    path = write_adapter_file(TENSORS, tmp_path / f"a{suffix}", adapter_version=3, model_version=7)
    assert [p.name for p in tmp_path.iterdir()] == [f"a{suffix}"]  # no temporary file left
    file = read_adapter_file(path)
    assert file.format == format_for(path)
    assert sorted(file.tensors) == sorted(TENSORS)
    for name, value in TENSORS.items():
        assert file.tensors[name].dtype == value.dtype and np.array_equal(file.tensors[name], value)
    if suffix == ".onnx_adapter":
        assert (file.adapter_version, file.model_version) == (3, 7)


def test_onnx_adapter_files_load_with_onnxruntimes_own_readers(tmp_path: Path) -> None:
    path = write_adapter_file(TENSORS, tmp_path / "a.onnx_adapter", adapter_version=2, model_version=5)
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    read = ort.AdapterFormat.read_adapter(str(path))
    assert (read.get_adapter_version(), read.get_model_version()) == (2, 5)
    params = read.get_parameters()
    assert sorted(params) == sorted(TENSORS)
    assert np.array_equal(params["m.lora_B.weight"].numpy(), TENSORS["m.lora_B.weight"])


def test_unreadable_and_unknown_files_are_adapter_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx_adapter"
    junk.write_bytes(b"not an adapter at all")
    with pytest.raises(AdapterError, match=r"junk\.onnx_adapter: not a readable onnx_adapter adapter file"):
        read_adapter_file(junk)
    with pytest.raises(AdapterError, match="no such adapter file"):
        read_adapter_file(tmp_path / "missing.npz")
    with pytest.raises(AdapterError, match=r"cannot tell the adapter format from the suffix '\.bin'"):
        write_adapter_file(TENSORS, tmp_path / "a.bin")
    # an unusual suffix is still read by content
    write_adapter_file(TENSORS, tmp_path / "x.npz")
    (tmp_path / "x.npz").rename(tmp_path / "x.weights")
    assert read_adapter_file(tmp_path / "x.weights").format == "npz"


def test_scalars_are_refused_for_onnx_adapter_and_inputs_are_protected(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="scalar"):
        write_adapter_file({"s": np.array(1.0, np.float32)}, tmp_path / "s.onnx_adapter")
    source = write_adapter_file(TENSORS, tmp_path / "in.npz")
    before = source.read_bytes()
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        write_adapter_file({"x": np.ones(1, np.float32)}, source, protect=[source])
    assert source.read_bytes() == before


def test_onnx_adapter_files_refuse_dtypes_onnxruntime_cannot_read_back(tmp_path: Path) -> None:
    import ml_dtypes

    # onnxruntime writes a bool tensor it then fails to read; bfloat16 it does not take from numpy
    for dtype in (np.bool_, ml_dtypes.bfloat16):
        path = tmp_path / "a.onnx_adapter"
        with pytest.raises(AdapterError, match=rf"'t' has dtype {np.dtype(dtype).name}.*write \.safetensors"):
            write_adapter_file({"t": np.ones(2, dtype)}, path)
        assert not path.exists()
        same = write_adapter_file({"t": np.ones(2, dtype)}, tmp_path / "a.safetensors")
        assert read_adapter_file(same).tensors["t"].dtype == dtype


def test_npz_members_claiming_more_data_than_they_hold_are_refused_before_reading(tmp_path: Path) -> None:
    import struct
    import zipfile

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4096, 4096), }"
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64)
        archive.writestr("note.txt", b"not an array")
    with pytest.raises(AdapterError, match=r"member 'x\.npy' claims shape \(4096, 4096\) of float32"):
        read_adapter_file(tmp_path / "a.npz")
    with zipfile.ZipFile(tmp_path / "b.npz", "w") as archive:
        archive.writestr("note.txt", b"not an array")  # np.load would hand back these bytes as a "tensor"
    with pytest.raises(AdapterError, match="not a readable npz adapter file"):
        read_adapter_file(tmp_path / "b.npz")
