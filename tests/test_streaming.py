"""Folding streams: values computed in row blocks equal the whole-tensor formula, and memory stays a few
blocks whatever the tensor or model size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from synthetic import DecoderSpec, build_decoder

import lora_onnx
from lora_onnx import LoraConfig
from lora_onnx.kinds import deltas
from lora_onnx.model import streaming
from lora_onnx.model.load import load_model
from lora_onnx.model.manifest import read_branches
from lora_onnx.model.save import save_model
from lora_onnx.stages.fold import branch_delta, fold_branches

REPO = Path(__file__).resolve().parent.parent
F = TensorProto.FLOAT


def _rng(shape: tuple[int, ...], seed: int, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _mixed_model() -> onnx.ModelProto:
    """MatMul (in,out), Gemm transB=1 (out,in), an fp16 weight through Cast, a grouped conv."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="/fc1/MatMul"),
        helper.make_node("Gemm", ["h1", "W2"], ["h2"], name="/fc2/Gemm", transB=1),
        helper.make_node("Cast", ["W3"], ["W3f"], name="/fc3/Cast", to=F),
        helper.make_node("MatMul", ["h2", "W3f"], ["y"], name="/fc3/MatMul"),
        helper.make_node("Conv", ["img", "Wc"], ["c"], name="/conv/Conv", group=2, pads=[1, 1, 1, 1]),
    ]
    inits = {
        "W1": _rng((24, 40), 1),
        "W2": _rng((36, 40), 2),
        "W3": _rng((36, 20), 3, np.float16),
        "Wc": _rng((6, 2, 3, 3), 4),
    }
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("x", F, [3, 24]),
            helper.make_tensor_value_info("img", F, [1, 4, 5, 5]),
        ],
        [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("c", F, None)],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("external", [False, True])
def test_streamed_blocks_equal_the_whole_tensor_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    source = _mixed_model()
    if external:  # weights read from a data file (FileRows), else from inline values (ArrayRows)
        path = tmp_path / "base.onnx"
        onnx.save(source, path, save_as_external_data=True, location="base.onnx.data", size_threshold=0)
        source = path  # type: ignore[assignment]
    injected = lora_onnx.inject(source, LoraConfig(rank=2, init="random", seed=5)).model
    # blocks of a few rows, so every tensor spans many blocks and group boundaries fall inside them
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 200)
    folded = fold_branches(injected)
    branches = {b.weight: b for b in read_branches(injected.proto)}
    assert set(folded.model.overrides) == set(branches) == {"W1", "W2", "W3", "Wc"}
    for weight, producer in folded.model.overrides.items():
        assert isinstance(producer, streaming.StreamedTensor) and producer.rows_per_chunk < 4
        original = injected.array(weight)
        expected = (original.astype(np.float32) + branch_delta(injected, branches[weight])).astype(
            original.dtype
        )
        actual = producer()
        assert actual.dtype == original.dtype and actual.shape == original.shape
        tolerance = 1e-3 if original.dtype == np.float16 else 1e-6
        assert np.abs(actual.astype(np.float64) - expected).max() <= tolerance * np.abs(expected).max()
        # what the save path writes is exactly the producer's value
        out = tmp_path / f"{weight}.bin"
        with open(out, "wb") as file:
            assert producer.write_into(file) == actual.nbytes
        assert out.read_bytes() == actual.tobytes()

    # end to end: the merged model (data streamed into a new file) equals the injected one in onnxruntime
    # (y passes the fp16 weight, which the merge rounds to fp16: ~5e-4 relative)
    save_model(injected, tmp_path / "injected.onnx")
    lora_onnx.merge(tmp_path / "injected.onnx", output=tmp_path / "merged.onnx")
    feeds = {"x": _rng((3, 24), 6), "img": _rng((1, 4, 5, 5), 7)}
    for tolerance, a, b in zip(
        (2e-3, 1e-5),
        _run(tmp_path / "injected.onnx", feeds),
        _run(tmp_path / "merged.onnx", feeds),
        strict=True,
    ):
        assert np.abs(a - b).max() <= tolerance * np.abs(a).max()


def test_fold_holds_a_few_blocks_not_a_tensor(tmp_path: Path) -> None:
    """numpy's own allocations (tracemalloc) while saving a fold stay far below one weight's size."""
    spec = DecoderSpec(layers=1, hidden=512, intermediate=1536, heads=8, vocab=16384)
    base = build_decoder(tmp_path / "base" / "model.onnx", spec)
    lora_onnx.inject(base, LoraConfig(rank=8, init="random"), output=tmp_path / "lora" / "model.onnx")
    folded = fold_branches(load_model(tmp_path / "lora" / "model.onnx"))
    assert spec.largest_tensor_bytes == 16384 * 512 * 4  # the 32 MB lm_head, folded like the rest
    tracemalloc.start()
    try:
        save_model(folded.model, tmp_path / "merged" / "model.onnx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # three working buffers (rows, scratch / delta, cast) of CHUNK_BYTES each, plus one branch's A and B
    assert peak < 4 * streaming.CHUNK_BYTES + 2 * 16384 * 8 * 4
    assert peak < spec.largest_tensor_bytes


_MERGE_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import lora_onnx

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    lora_onnx.merge(sys.argv[1], output=sys.argv[2])
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (after - before) * 1024, "seconds": seconds}))
    """
)


@pytest.mark.slow
def test_merge_peak_memory_in_a_subprocess(tmp_path: Path) -> None:
    """A ~270 MB model merges in a fresh process whose peak RSS grows by a small fraction of the data."""
    spec = DecoderSpec(layers=4, hidden=1024, intermediate=2816, heads=8, vocab=8192)
    build_decoder(tmp_path / "base" / "model.onnx", spec)
    lora = tmp_path / "lora" / "model.onnx"
    lora_onnx.inject(tmp_path / "base" / "model.onnx", LoraConfig(rank=8, init="random"), output=lora)
    merged_path = tmp_path / "merged" / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-c", _MERGE_CHILD, str(lora), str(merged_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    assert spec.data_bytes > 250e6
    # a tensor-at-a-time fold would hold the 33 MB lm_head several times over (~100 MB)
    assert growth < 0.1 * spec.data_bytes
    assert growth < spec.largest_tensor_bytes

    # the merged data really holds W + s * A @ B (checked for the lm_head, the largest tensor)
    lora_model, merged = load_model(lora), load_model(merged_path)
    branch = next(b for b in read_branches(lora_model.proto) if b.weight == "lm_head.weight")
    expected = lora_model.array("lm_head.weight") + branch_delta(lora_model, branch)
    assert np.abs(merged.array("lm_head.weight") - expected).max() <= 1e-6 * np.abs(expected).max()
    assert not read_branches(merged.proto)


def test_a_failing_write_surfaces_in_the_caller_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread's error (a full disk) reaches the caller; the save cleans up and says so."""
    injected = lora_onnx.inject(_mixed_model(), LoraConfig(rank=2, init="random")).model
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 200)
    producer = fold_branches(injected).model.overrides["W1"]
    assert isinstance(producer, streaming.StreamedTensor)

    class FullDisk:
        writes = 0

        def write(self, data: object) -> int:
            self.writes += 1
            raise OSError(28, "No space left on device")

    target = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        producer.write_into(target)  # type: ignore[arg-type]
    assert target.writes == 1  # the writer stopped at the first failure

    path = tmp_path / "base.onnx"
    onnx.save(_mixed_model(), path, save_as_external_data=True, location="base.onnx.data", size_threshold=0)
    lora_onnx.inject(path, LoraConfig(rank=2, init="random"), output=tmp_path / "lora" / "model.onnx")
    merged = fold_branches(load_model(tmp_path / "lora" / "model.onnx")).model
    real_write_into = streaming.StreamedTensor.write_into

    def failing(self: streaming.StreamedTensor, out: object) -> int:
        real_write_into(self, FullDisk())  # type: ignore[arg-type]
        return 0

    monkeypatch.setattr(streaming.StreamedTensor, "write_into", failing)
    with pytest.raises(lora_onnx.LoraOnnxError, match="disk full"):
        save_model(merged, tmp_path / "merged" / "model.onnx")
    assert list((tmp_path / "merged").iterdir()) == []


def test_a_per_channel_factor_scales_rows_or_columns_of_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """``channel_scale`` (DoRA's magnitude / norm) multiplies W + delta per output channel, in any layout."""
    injected = lora_onnx.inject(_mixed_model(), LoraConfig(rank=2, init="random", seed=9)).model
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 200)
    branches = {b.weight: b for b in read_branches(injected.proto)}
    rng = np.random.default_rng(3)
    # W1 (in, out): columns are output channels; W2 (out, in) and the conv: rows are
    for weight, factor_shape in (("W1", (1, 40)), ("W2", (36, 1)), ("Wc", (6, 1, 1, 1))):
        factor = rng.uniform(0.5, 2.0, size=factor_shape).astype(np.float32)
        produced = deltas.folded_weight(
            injected, weight, [branches[weight]], channel_scale=lambda ndim, f=factor: f
        )()
        original = injected.array(weight).astype(np.float32)
        expected = (original + branch_delta(injected, branches[weight])) * factor
        assert np.abs(produced - expected).max() <= 1e-6 * np.abs(expected).max()
