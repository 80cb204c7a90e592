"""External data: injection reads no weight bytes (even of a model over 2 GB), outputs bring their data
(hard link, clone or copy) and never point back through ``..``, LoRA tensors get their own small file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from synthetic import DecoderSpec, build_decoder

import lora_onnx
from lora_onnx import LoraConfig
from lora_onnx.cli.main import main
from lora_onnx.model import save
from lora_onnx.model.load import load_model
from lora_onnx.model.manifest import read_branches
from lora_onnx.model.tensors import external_ref

REPO = Path(__file__).resolve().parent.parent
SMALL = DecoderSpec(layers=1, hidden=64, intermediate=128, heads=4, vocab=256)


def _refs(path: Path) -> dict[str, str]:
    model = onnx.load(path, load_external_data=False)
    return {t.name: ref.location for t in model.graph.initializer if (ref := external_ref(t)) is not None}


def _reflink_supported(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"x" * 4096)
    cloned = save._reflink(probe, folder / "probe.clone")
    for path in (probe, folder / "probe.clone"):
        path.unlink(missing_ok=True)
    return cloned


def _inject_in_a_child(source: Path, output: Path, mode: str) -> dict:
    """Inject in a fresh process (so its reads, maps and memory are its own); its measurements."""
    done = subprocess.run(
        [sys.executable, "-c", _INJECT_CHILD, str(source), str(output), mode],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


_INJECT_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    import lora_onnx
    from lora_onnx import LoraConfig

    source, output, link = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "link"
    data = str(source.with_name(source.name + ".data"))
    mapped = []

    def audit(event, args):
        # numpy.memmap and mmap.mmap both raise mmap.__new__; reading through read() shows in rchar
        if event == "mmap.__new__" and args[1] > 1 << 20:
            mapped.append(args[1])

    sys.addaudithook(audit)

    def rchar():
        fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
        return int(fields["rchar"])

    lora_onnx.inspect(source)  # warm lazy imports, so what follows is the pass itself
    before_rss, before_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rchar()
    start = time.perf_counter()
    result = lora_onnx.inject(source, LoraConfig(rank=8), output=output, link_data=link)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "read": rchar() - before_read,
        "rss_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) * 1024,
        "mapped": mapped,
        "branches": len(result.branches),
        "seconds": seconds,
    }))
    """
)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads are counted through Linux /proc")
def test_inject_reads_no_weight_bytes_of_a_model_over_2_gb(tmp_path: Path) -> None:
    """A 2.6 GB decoder whose data file is sparse (no disk blocks) is injected with no weight read: into
    another folder with --link-data, and beside the base (by default: the output refers to its data)."""
    spec = DecoderSpec(layers=10, hidden=2048, intermediate=5632, heads=16, vocab=32000)
    source = build_decoder(tmp_path / "base" / "model.onnx", spec, fill="sparse")
    data = source.with_name("model.onnx.data")
    assert data.stat().st_size > 2**31 and data.stat().st_blocks == 0
    output = tmp_path / "elsewhere" / "lora.onnx"
    stats = _inject_in_a_child(source, output, "link")
    assert stats["branches"] == len(spec.linears()) == 71
    assert stats["mapped"] == []  # nothing memory-mapped
    assert stats["read"] < 4 << 20  # the 75 KB graph and the odd module: no 260 MB weight, let alone 2.6 GB
    assert stats["rss_growth"] < 0.03 * spec.data_bytes

    # the output is a small graph beside its own data; the protobuf limit is nowhere near
    assert output.stat().st_size < 1 << 20
    out_data = output.with_name("lora.onnx.data")
    if not _reflink_supported(tmp_path):
        assert os.path.samefile(out_data, data)  # a hard link: no byte copied
    assert out_data.stat().st_blocks == 0  # still sparse: nothing was written into it
    locations = set(_refs(output).values())
    assert locations == {"lora.onnx.data", "lora.onnx.lora.data"}
    # path-based tools work on it (shape inference takes the path of a model over 2 GB)
    onnx.shape_inference.infer_shapes_path(str(output), str(tmp_path / "elsewhere" / "inferred.onnx"))
    assert (tmp_path / "elsewhere" / "inferred.onnx").stat().st_size < 2 << 20

    beside = source.with_name("lora.onnx")
    stats = _inject_in_a_child(source, beside, "default")
    assert stats["mapped"] == [] and stats["read"] < 4 << 20
    assert set(_refs(beside).values()) == {"model.onnx.data", "lora.onnx.lora.data"}
    assert not beside.with_name("lora.onnx.data").exists() and data.stat().st_blocks == 0


def test_injected_folder_is_self_contained(tmp_path: Path) -> None:
    """The output folder can be moved and the source deleted: nothing refers back to the input's folder."""
    source = build_decoder(tmp_path / "base" / "model.onnx", SMALL)
    ids = np.arange(12).reshape(2, 6)
    expected = _run(source, ids)
    output = tmp_path / "out" / "nested" / "model.onnx"
    lora_onnx.inject(source, LoraConfig(rank=4, init="gaussian"), output=output)
    for location in _refs(output).values():
        assert not Path(location).is_absolute() and ".." not in Path(location).parts
        assert (output.parent / location).is_file()
    moved = tmp_path / "moved"
    shutil.move(output.parent, moved)
    shutil.rmtree(tmp_path / "base")
    assert np.abs(_run(moved / "model.onnx", ids) - expected).max() <= 1e-6 * np.abs(expected).max()


def test_lora_tensors_have_their_own_small_file_and_tiny_ones_stay_inline(tmp_path: Path) -> None:
    source = build_decoder(tmp_path / "base" / "model.onnx", SMALL)
    output = tmp_path / "out" / "model.onnx"
    result = lora_onnx.inject(source, LoraConfig(rank=8, init="random"), output=output)
    refs = _refs(output)
    model = onnx.load(output, load_external_data=False)
    for branch in read_branches(model):
        for name in (branch.a, branch.b):
            assert refs[name] == "model.onnx.lora.data"  # (64, 8) floats: 2 KiB, over the 1 KiB threshold
        assert branch.scale_tensor not in refs  # a scalar stays inline in the graph
    base_names = {t.name for t in onnx.load(source, load_external_data=False).graph.initializer}
    assert {refs[name] for name in base_names if name in refs} == {"model.onnx.data"}
    lora_file = output.with_name("model.onnx.lora.data").stat().st_size
    lora_bytes = sum(
        result.model.array(name).nbytes for b in result.branches for name in (b.a, b.b) if name in refs
    )
    assert lora_bytes <= lora_file < lora_bytes + 4096 * 2 * len(result.branches) + 4096


def test_data_is_copied_when_a_link_is_impossible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = build_decoder(tmp_path / "base" / "model.onnx", SMALL)

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(save.os, "link", no_link)
    monkeypatch.setattr(save, "_reflink", lambda source, temp: False)
    output = tmp_path / "out" / "model.onnx"
    lora_onnx.inject(source, LoraConfig(rank=4), output=output)
    data, copied = source.with_name("model.onnx.data"), output.with_name("model.onnx.data")
    assert not os.path.samefile(data, copied) and data.stat().st_nlink == 1
    assert copied.read_bytes() == data.read_bytes()


def test_copy_data_gives_outputs_onnx_load_and_checker_accept(tmp_path: Path) -> None:
    """onnx >= 1.21 refuses hard-linked external data; ``link_data=False`` / --copy-data avoid links."""
    source = build_decoder(tmp_path / "base" / "model.onnx", SMALL)
    output = tmp_path / "out" / "model.onnx"
    lora_onnx.inject(source, LoraConfig(rank=4), output=output, link_data=False)
    assert source.with_name("model.onnx.data").stat().st_nlink == 1
    onnx.checker.check_model(str(output), full_check=True)
    loaded = onnx.load(output)  # with its external data
    assert len(loaded.graph.initializer) == len(load_model(output).proto.graph.initializer)

    cli_out = tmp_path / "cli" / "model.onnx"
    assert main(["inject", str(source), "-o", str(cli_out), "--copy-data"]) == 0
    assert not os.path.samefile(cli_out.with_name("model.onnx.data"), source.with_name("model.onnx.data"))
    onnx.checker.check_model(str(cli_out))


def test_merge_output_passes_the_checker_by_path(tmp_path: Path) -> None:
    """A merged model writes its own fresh data file, which path-based onnx tools accept."""
    source = build_decoder(tmp_path / "base" / "model.onnx", SMALL)
    lora_onnx.inject(source, LoraConfig(rank=4, init="random"), output=tmp_path / "lora" / "model.onnx")
    merged = tmp_path / "merged" / "model.onnx"
    lora_onnx.merge(tmp_path / "lora" / "model.onnx", output=merged)
    assert merged.with_name("model.onnx.data").stat().st_nlink == 1
    onnx.checker.check_model(str(merged), full_check=True)
    base_nodes = [(n.op_type, n.name) for n in onnx.load(source, load_external_data=False).graph.node]
    assert [(n.op_type, n.name) for n in onnx.load(merged, load_external_data=False).graph.node] == base_nodes
