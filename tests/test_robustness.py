"""Bad inputs and hostile file systems: a one-line error naming the culprit, a non-zero exit, no output.

Every case also checks the inputs are byte-for-byte unchanged. Read-only folders and full disks are real
where the OS allows it (chmod as a normal user) and simulated otherwise (as root chmod stops nothing):
the file functions lora-onnx writes through are patched to fail with EROFS / ENOSPC under one folder.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from batch_helpers import (
    MODELS,
    REPO,
    cli,
    custom_op_model,
    dense_model,
    files_under,
    is_root,
    no_site_model,
    save,
    tree_hashes,
)
from onnx import numpy_helper

from lora_onnx import LoraConfig, inject
from lora_onnx.cli.main import main
from lora_onnx.errors import ModelLoadError
from lora_onnx.model.load import load_model


def one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lora-onnx: error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    save(dense_model(), folder / "dense.onnx")
    save(dense_model(1), folder / "ext.onnx", external=True)
    shutil.copytree(MODELS / "tiny_llama", folder / "llama")
    return folder


def test_missing_model(tmp_path: Path) -> None:
    result = cli("inject", tmp_path / "nope.onnx", "-o", tmp_path / "out" / "o.onnx")
    assert result.returncode == 2
    one_line_error(result.stderr, "nope.onnx: no such file")
    assert files_under(tmp_path / "out") == []


def test_truncated_model_at_every_top_level_boundary(tmp_path: Path) -> None:
    """Protobuf parses a prefix that ends between top-level fields; each such cut must still be refused."""
    data = (MODELS / "tiny_bert" / "model.onnx").read_bytes()
    target = tmp_path / "cut.onnx"
    cuts = [*range(0, 64), *range(len(data) - 64, len(data)), *range(64, len(data) - 64, 4099)]
    for cut in cuts:
        target.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=r"cut\.onnx"):
            load_model(target)
    target.write_bytes(data[:-4])  # cut right after the graph: the opset_import is gone, the graph is whole
    before = tree_hashes(tmp_path)
    result = cli("inject", target, "-o", tmp_path / "out" / "o.onnx")
    assert result.returncode == 2
    one_line_error(result.stderr, "cut.onnx", "opset_import is empty", "truncated")
    assert files_under(tmp_path / "out") == [] and tree_hashes(tmp_path) == before


def test_not_an_onnx_file(tmp_path: Path) -> None:
    for name, payload in (("text.onnx", b"hello, world\n"), ("noise.onnx", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(payload)
        result = cli("inject", tmp_path / name, "-o", tmp_path / "out" / name)
        assert result.returncode == 2
        one_line_error(result.stderr, f"{name}: not an ONNX model")
    assert files_under(tmp_path / "out") == []


@pytest.mark.slow
def test_missing_or_truncated_external_data(tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    shutil.copytree(MODELS / "tiny_llama", folder)
    data = folder / "model.onnx.data"
    data.rename(tmp_path / "moved.data")
    result = cli("inject", folder / "model.onnx", "-o", tmp_path / "out" / "o.onnx")
    assert result.returncode == 2
    one_line_error(
        result.stderr, "external data file", "model.onnx.data", "initializer 'model.", "is missing"
    )
    data.write_bytes((tmp_path / "moved.data").read_bytes()[:1000])
    result = cli("merge", folder / "model.onnx", "-o", tmp_path / "out" / "o.onnx")
    assert result.returncode == 2
    one_line_error(result.stderr, "is truncated", "needs bytes")
    assert files_under(tmp_path / "out") == []


@pytest.mark.slow
def test_op_and_opset_the_validator_cannot_run(tmp_path: Path) -> None:
    custom = save(custom_op_model(), tmp_path / "custom.onnx")
    future = dense_model()
    future.opset_import[0].version = 99
    future_path = save(future, tmp_path / "future.onnx")
    before = tree_hashes(tmp_path)
    result = cli("inject", custom, "-o", tmp_path / "out" / "a.onnx", "--validate")
    assert result.returncode == 2
    one_line_error(result.stderr, f"onnxruntime cannot load {custom}", "com.example:Frobnicate")
    assert "lora-onnx-" not in result.stderr, "the user's file is named, not a temporary copy"
    result = cli("inject", future_path, "-o", tmp_path / "out" / "b.onnx", "--init", "random", "--validate")
    assert result.returncode == 2
    one_line_error(result.stderr, str(future_path), "Opset 99")
    result = cli("validate", custom, custom)
    assert result.returncode == 2
    one_line_error(result.stderr, "com.example:Frobnicate")
    assert files_under(tmp_path / "out") == [] and tree_hashes(tmp_path) == before


def test_model_without_an_eligible_site(tmp_path: Path) -> None:
    path = save(no_site_model(), tmp_path / "plain.onnx")
    result = cli("inject", path, "-o", tmp_path / "out" / "o.onnx")
    assert result.returncode == 2
    one_line_error(result.stderr, "no node that can take a LoRA branch", "dynamic_mm", "not a constant")
    assert files_under(tmp_path / "out") == []


@pytest.mark.slow
def test_adapter_shape_mismatch_on_merge(tmp_path: Path) -> None:
    """A rewritten model whose A no longer fits its weight (changed by another tool) is refused by name."""
    rewritten = tmp_path / "lora.onnx"
    inject(save(dense_model(), tmp_path / "base.onnx"), LoraConfig(rank=2, init="random"), output=rewritten)
    proto = onnx.load(rewritten)
    for tensor in proto.graph.initializer:
        if tensor.name == "fc1.lora_A.weight":
            tensor.CopyFrom(numpy_helper.from_array(np.ones((5, 2), np.float32), tensor.name))
    onnx.save(proto, rewritten)
    before = tree_hashes(tmp_path)
    for extra in ((), ("--validate",)):
        result = cli("merge", rewritten, "-o", tmp_path / "out" / "m.onnx", *extra)
        assert result.returncode == 2
        one_line_error(result.stderr, "tensor 'fc1.lora_A.weight'", "[5, 2]", "'fc1.weight' [8, 8]", "[8, 2]")
    assert files_under(tmp_path / "out") == [] and tree_hashes(tmp_path) == before


@pytest.mark.slow
def test_output_equal_to_the_input(inputs: Path) -> None:
    inject(inputs / "dense.onnx", LoraConfig(rank=2, init="random"), output=inputs / "lora.onnx")
    before = tree_hashes(inputs)
    for command, name in (("inject", "dense.onnx"), ("merge", "lora.onnx")):
        result = cli(command, inputs / name, "-o", inputs / name)
        assert result.returncode == 2
        one_line_error(result.stderr, "refusing to overwrite the input", name)
    # the output's data file would replace the input's model
    result = cli("inject", inputs / "ext.onnx", "-o", inputs / "ext_lora.onnx")
    assert result.returncode == 0, "a distinct name is fine"
    # a model output without the .onnx suffix is refused (issue 10): it would pass for a model file
    result = cli("inject", inputs / "ext.onnx", "-o", inputs / "ext")
    assert result.returncode == 2
    one_line_error(result.stderr, "must end in .onnx", f"name it {inputs / 'ext_lora.onnx'}")  # not the input
    result = cli("inject", inputs / "ext.onnx", "-o", inputs / "ext.onnx.data")
    assert result.returncode == 2
    one_line_error(result.stderr, "refusing to overwrite the input", "ext.onnx.data")
    after = tree_hashes(inputs)
    assert {k: after[k] for k in before} == before
    result = cli("batch", inputs, "-o", inputs)
    assert result.returncode == 2
    one_line_error(result.stderr, "is the input folder")


# --- simulated file-system failures --------------------------------------------------------------


class FaultyFolder:
    """Make writes under ``folder`` fail like a read-only mount (``readonly``) or a full disk (``full``).

    Patches the functions lora-onnx writes through: open (builtins and io, so pathlib too), os.open,
    os.link, os.replace, os.rename, os.mkdir and os.copy_file_range. A full disk accepts ``budget``
    bytes first, so a partly written temporary file exists and must be cleaned up.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path, mode: str, budget: int = 100) -> None:
        self.folder = folder.resolve()
        self.mode = mode
        self.budget = budget
        real_open, real_os_open = builtins.open, os.open
        real_link, real_replace, real_rename, real_mkdir = os.link, os.replace, os.rename, os.mkdir

        def inside(path: object) -> bool:
            if isinstance(path, int):
                return False
            resolved = Path(os.path.abspath(os.fspath(path)))  # type: ignore[arg-type]
            return resolved == self.folder or self.folder in resolved.parents

        def fail(code: int, path: object) -> None:
            raise OSError(code, os.strerror(code), os.fspath(path))  # type: ignore[arg-type]

        def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
            writing = any(flag in mode for flag in "wax+")
            if writing and inside(file):
                if self.mode == "readonly":
                    fail(errno.EROFS, file)
                return _FullFile(real_open(file, mode, *args, **kwargs), self)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.mode == "readonly" and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
                fail(errno.EROFS, path)
            return real_os_open(path, flags, *args, **kwargs)

        def guard(real):  # type: ignore[no-untyped-def]
            def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
                targets = [a for a in args[:2] if isinstance(a, str | os.PathLike)]
                if self.mode == "readonly" and any(inside(t) for t in targets[-1:]):
                    fail(errno.EROFS, targets[-1])
                return real(*args, **kwargs)

            return wrapper

        def full_copy_range(*args, **kwargs):  # type: ignore[no-untyped-def]
            fail(errno.ENOSPC, "copy_file_range")

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "link", guard(real_link))
        monkeypatch.setattr(os, "replace", guard(real_replace))
        monkeypatch.setattr(os, "rename", guard(real_rename))
        monkeypatch.setattr(os, "mkdir", guard(real_mkdir))
        if mode == "full":
            monkeypatch.setattr(os, "copy_file_range", full_copy_range)


class _FullFile:
    def __init__(self, file: io.IOBase, owner: FaultyFolder) -> None:
        self._file = file
        self._owner = owner

    def write(self, data: bytes | str) -> int:
        if len(data) > self._owner.budget:
            self._file.write(data[: self._owner.budget])
            self._owner.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._owner.budget -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[object]:
        return iter(self._file)


@pytest.fixture
def readonly_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A read-only folder: chmod 555, plus simulated EROFS when chmod does not stop us (root)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        writable = True
    except PermissionError:
        writable = False
    if writable:
        FaultyFolder(monkeypatch, folder, "readonly")
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["inject", "merge", "batch"])
def test_output_inside_a_read_only_folder(
    inputs: Path, readonly_folder: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_hashes(inputs)
    if command == "merge":
        source = inputs.parent / "lora.onnx"
        inject(inputs / "ext.onnx", LoraConfig(rank=2, init="random"), output=source)
        args = ["merge", str(source), "-o", str(readonly_folder / "m.onnx")]
    elif command == "inject":
        args = ["inject", str(inputs / "ext.onnx"), "-o", str(readonly_folder / "sub" / "m.onnx")]
    else:
        args = ["batch", str(inputs), "-o", str(readonly_folder / "out")]
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    if command == "batch":
        failures = [line for line in captured.err.splitlines() if line.strip()]
        assert len(failures) == 3 and all("cannot create the output folder" in line for line in failures)
        assert "3 failed" in captured.out
    else:
        one_line_error(captured.err, str(readonly_folder), "cannot")
    assert files_under(readonly_folder) == []
    assert {k: v for k, v in tree_hashes(inputs).items() if k in before} == before


@pytest.mark.slow
def test_output_inside_a_really_read_only_folder(inputs: Path, tmp_path: Path) -> None:
    """The same through the OS: as root, run the CLI without CAP_DAC_OVERRIDE so chmod 555 binds."""
    prefix: list[str] = []
    if is_root():
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("as root this needs setpriv to drop CAP_DAC_OVERRIDE; the simulated test covers it")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, "--bounding-set", caps, "--inh-caps", caps]
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    before = tree_hashes(inputs)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for target in (folder / "m.onnx", folder / "sub" / "m.onnx"):
            argv = [
                *prefix,
                sys.executable,
                "-m",
                "lora_onnx",
                "inject",
                str(inputs / "ext.onnx"),
                "-o",
                str(target),
            ]
            result = subprocess.run(argv, capture_output=True, text=True, env=env)
            assert result.returncode == 2, result.stderr
            one_line_error(result.stderr, str(target.parent) if target.parent != folder else str(target))
            assert "Permission denied" in result.stderr
    finally:
        folder.chmod(0o755)
    assert files_under(folder) == [] and tree_hashes(inputs) == before


@pytest.mark.parametrize(
    ("command", "model"), [("inject", "dense.onnx"), ("inject", "llama"), ("merge", "llama"), ("batch", "")]
)
def test_disk_full_during_a_write(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    command: str, model: str,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    source = inputs / model / "model.onnx" if model == "llama" else inputs / model
    if command == "merge":
        lora = tmp_path / "lora" / "model.onnx"
        inject(source, LoraConfig(rank=2, init="random"), output=lora)
        source = lora
    before = tree_hashes(inputs)
    FaultyFolder(monkeypatch, out, "full")
    if command == "batch":
        args = ["batch", str(inputs), "-o", str(out), "--init", "random"]
    else:
        args = [command, str(source), "-o", str(out / "m.onnx")]
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    if command == "batch":
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 3 and all("disk full while writing" in line for line in lines)
    else:
        one_line_error(captured.err, "disk full while writing", str(out / "m.onnx"), "nothing was written")
    assert files_under(out) == [], "no partial file, not even a temporary one"
    monkeypatch.undo()
    assert tree_hashes(inputs) == before
