"""Killing a run mid-write leaves the old output or none, never a partial model.

A child process runs the real CLI with a hook that pauses at a chosen point of the write (halfway
through a data file, halfway through the model file, or just before the model's final rename), tells
the test it is there, and waits; the test then SIGKILLs it. Deterministic: no timing guesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_helpers import REPO, copy_bundled, tree_hashes

from lora_onnx import LoraConfig, inject, load_model, validate
from lora_onnx.errors import LoraOnnxError

HOOK = r'''
import builtins, io, os, pathlib, sys, time

point, ready, *argv = sys.argv[1:]
real_open = builtins.open


def pause():
    pathlib.Path(ready).write_text(point)
    while True:
        time.sleep(60)


class Paused:
    """Writes half of the first chunk, makes it durable, then stops forever."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[: max(1, len(data) // 2)])
        self.file.flush()
        os.fsync(self.file.fileno())
        pause()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def hooked_open(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    name = "" if isinstance(file, int) else os.path.basename(os.fspath(file))
    wanted = ".data.tmp" if point == "data" else ".onnx.tmp"
    if ("w" in mode or "x" in mode) and point in ("data", "model") and wanted in name:
        return Paused(handle)
    return handle


builtins.open = io.open = hooked_open
if point == "commit":
    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        if os.fspath(target).endswith(".onnx"):
            pause()
        return real_replace(source, target, *args, **kwargs)

    os.replace = replace

from lora_onnx.cli.main import main

sys.exit(main(argv))
'''


def run_and_kill(tmp_path: Path, point: str, *argv: str | Path) -> None:
    script = tmp_path / "hooked.py"
    script.write_text(HOOK)
    ready = tmp_path / f"ready-{point}"
    ready.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(script), point, str(ready), *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"the child finished before reaching {point!r}: {out.decode()} {err.decode()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached {point!r}")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def visible_models(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.onnx") if not p.name.startswith("."))


def leftovers(folder: Path) -> list[str]:
    """Files a killed run may leave: only hidden temporary files, never under a model's name."""
    return sorted(
        p.name for p in folder.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.endswith(".lock"))
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled tiny Llama (external data) and a LoRA rewrite of it."""
    folder = copy_bundled(tmp_path_factory.mktemp("atomic"), ("tiny_llama",))
    inject(
        folder / "tiny_llama/model.onnx",
        LoraConfig(rank=4, init="random", seed=1),
        output=folder / "lora/model.onnx",
    )
    return folder


def command(kind: str, llama: Path, output: Path, rank: int) -> list[str | Path]:
    if kind == "inject":
        return [
            "inject",
            llama / "tiny_llama/model.onnx",
            "-o",
            output,
            "--rank",
            str(rank),
            "--init",
            "random",
        ]
    return ["merge", llama / "lora/model.onnx", "-o", output]


@pytest.mark.parametrize("kind", ["inject", "merge"])
@pytest.mark.parametrize("point", ["data", "model", "commit"])
@pytest.mark.slow
def test_kill_over_an_old_output_leaves_the_old_model_or_none(
    tmp_path: Path, llama: Path, kind: str, point: str
) -> None:
    inputs_before = tree_hashes(llama)
    output = tmp_path / "out" / "model.onnx"
    # an older output with data files under the names the new run writes (and a link to the input's data)
    inject(llama / "tiny_llama/model.onnx", LoraConfig(rank=2, init="random"), output=output)
    old_model = output.read_bytes()
    old_outputs = validate(output, output)  # runs: the old model and its data agree
    assert old_outputs.ok

    run_and_kill(tmp_path, point, *command(kind, llama, output, rank=4))

    assert tree_hashes(llama) == inputs_before, "inputs are never modified"
    models = visible_models(tmp_path / "out")
    if point == "commit":
        # the new data files are in place and the old model was removed first: no model at all
        assert models == []
    else:
        assert models == [output] and output.read_bytes() == old_model, "the old model is untouched"
        load_model(output)  # its data files are complete
        assert validate(output, output).ok
    assert all(name.startswith(".") for name in leftovers(tmp_path / "out"))

    # the next run is not disturbed by what the killed one left behind
    completed = subprocess.run(
        [sys.executable, "-m", "lora_onnx", *map(str, command(kind, llama, output, rank=4))],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    assert validate(llama / "lora/model.onnx" if kind == "merge" else output, output).ok


@pytest.mark.parametrize("kind", ["inject", "merge"])
def test_kill_without_an_old_output_leaves_nothing(tmp_path: Path, llama: Path, kind: str) -> None:
    output = tmp_path / "out" / "model.onnx"
    run_and_kill(tmp_path, "model", *command(kind, llama, output, rank=4))
    assert visible_models(tmp_path / "out") == []
    with pytest.raises(LoraOnnxError, match="no such file"):
        load_model(output)
