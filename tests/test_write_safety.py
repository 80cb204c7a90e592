"""Writing safely: no hard links by default, nothing left by a stopped run, no output over an input,
one writer per output at a time, every output name that fits the file system works."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from batch_helpers import MODELS, REPO, cli, dense_model, save, tree_hashes
from builders import write_adapter
from test_atomic_writes import HOOK, leftovers, run_and_kill

from lora_onnx import LoraConfig, inject, load_model, validate
from lora_onnx.cli.main import main
from lora_onnx.common.atomic import TEMP_PATTERN, _start_token, reclaim_stale
from lora_onnx.model.tensors import external_ref

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-onnx: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A private copy of the bundled tiny Llama (model.onnx + model.onnx.data, a few MB)."""
    shutil.copytree(MODELS / "tiny_llama", tmp_path / "src")
    return tmp_path / "src" / "model.onnx"


def locations(model: Path) -> set[str]:
    graph = onnx.load(model, load_external_data=False).graph
    return {ref.location for t in graph.initializer if (ref := external_ref(t)) is not None}


# --- no hard links by default -------------------------------------------------------------------------


def test_an_output_elsewhere_gets_its_own_data_and_onnx_still_loads_the_input(
    llama: Path, tmp_path: Path
) -> None:
    data = llama.with_name("model.onnx.data")
    out = tmp_path / "elsewhere" / "lora.onnx"
    result = cli("inject", llama, "-o", out, "--rank", "2", "--init", "random")
    assert result.returncode == 0, result.stderr
    assert data.stat().st_nlink == 1, "the input's data file is not hard-linked"
    assert out.with_name("lora.onnx.data").stat().st_nlink == 1
    assert not os.path.samefile(out.with_name("lora.onnx.data"), data)
    onnx.load(llama)  # onnx >= 1.21 refuses data files with several links: both load
    onnx.load(out)
    onnx.checker.check_model(str(out))
    assert validate(inject(llama, LoraConfig(rank=2, init="random")).model, out, rtol=0, atol=0).ok


def test_link_data_hard_links_on_request(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "lora.onnx"
    for command in (["inject", llama, "-o", out], ["batch", llama.parent, "-o", tmp_path / "b"]):
        result = cli(*command, "--link-data")
        assert result.returncode == 0, result.stderr
    assert os.path.samefile(out.with_name("lora.onnx.data"), llama.with_name("model.onnx.data"))
    assert os.path.samefile(tmp_path / "b" / "model.onnx.data", llama.with_name("model.onnx.data"))
    assert llama.with_name("model.onnx.data").stat().st_nlink == 3


def test_proofs_run_in_memory_and_never_link_the_input(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proof's rewritten model runs in onnxruntime from memory, its external data read where it is: the
    # input's data file never gets a second link (onnx >= 1.21 would refuse the input meanwhile, and for
    # good if the run were killed), and no scratch model is written.
    import lora_onnx.proofs.validation as validation

    data = llama.with_name("model.onnx.data")
    links: list[int] = []
    sources: list[object] = []
    create = validation.create_session

    def watching(path, provider, label=None):  # type: ignore[no-untyped-def]
        links.append(data.stat().st_nlink)
        sources.append(path)
        return create(path, provider, label)

    monkeypatch.setattr(validation, "create_session", watching)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    result = inject(llama, LoraConfig(rank=2, init="random"), validate=True)
    assert result.validation is not None and result.validation.ok
    assert links and set(links) == {1}
    assert any(isinstance(source, validation.InMemoryModel) for source in sources)
    assert not list(scratch.iterdir()), "no scratch model was written"


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_a_data_file_that_is_an_in_folder_symlink_is_brought_as_its_target(
    llama: Path, tmp_path: Path, link: bool
) -> None:
    # An in-folder link to the data is allowed (onnxruntime allows it); the output must get the bytes,
    # not a copy or link of the symbolic link, which would dangle in another folder.
    data = llama.with_name("model.onnx.data")
    data.rename(llama.with_name("real.bin"))
    data.symlink_to("real.bin")
    out = tmp_path / "elsewhere" / "lora.onnx"
    result = cli(
        "inject", llama, "-o", out, "--rank", "2", "--init", "random", *(["--link-data"] if link else [])
    )
    assert result.returncode == 0, result.stderr
    written = out.with_name("lora.onnx.data")
    assert not written.is_symlink() and written.stat().st_size == llama.with_name("real.bin").stat().st_size
    assert validate(inject(llama, LoraConfig(rank=2, init="random")).model, out, rtol=0, atol=0).ok


def test_batch_copies_by_default(llama: Path, tmp_path: Path) -> None:
    result = cli("batch", llama.parent, "-o", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert llama.with_name("model.onnx.data").stat().st_nlink == 1
    onnx.load(tmp_path / "b" / "model.onnx")


def test_an_output_beside_the_input_refers_to_its_data_which_stays_protected(llama: Path) -> None:
    out = llama.with_name("lora.onnx")
    result = cli("inject", llama, "-o", out, "--rank", "2", "--init", "random")
    assert result.returncode == 0, result.stderr
    assert not out.with_name("lora.onnx.data").exists(), "no second copy of unchanged data"
    assert locations(out) == {"model.onnx.data", "lora.onnx.lora.data"}
    assert llama.with_name("model.onnx.data").stat().st_nlink == 1
    onnx.load(out)
    assert validate(inject(llama, LoraConfig(rank=2, init="random")).model, out, rtol=0, atol=0).ok
    # the output reads the base's data: a later command writing over it is refused before any work
    before = tree_hashes(llama.parent)
    for command in (["merge", out, "-o", llama], ["inject", out, "-o", llama, "--name", "second"]):
        refused = cli(*command)
        assert refused.returncode == 2
        one_line_error(refused.stderr, "refusing to overwrite the input", "model.onnx.data")
    assert tree_hashes(llama.parent) == before
    # a new model written under the base's name from another base would change what the output reads
    other = save(dense_model(), llama.parent.parent / "other" / "model.onnx", external=True)
    refused_shared = cli("inject", other, "-o", llama)
    assert refused_shared.returncode == 2
    one_line_error(refused_shared.stderr, "lora.onnx refers to", "model.onnx.data")
    assert tree_hashes(llama.parent) == before
    # merging beside it writes a fresh data file and leaves the shared one alone
    merged = cli("merge", out, "-o", llama.with_name("merged.onnx"))
    assert merged.returncode == 0, merged.stderr
    assert {k: v for k, v in tree_hashes(llama.parent).items() if k in before} == before


# --- stopped runs leave nothing ---------------------------------------------------------------------


def hooked_child(tmp_path: Path, point: str, *argv: str | Path) -> tuple[subprocess.Popen, Path]:
    """The CLI in a child paused at ``point`` of its write (see test_atomic_writes.HOOK)."""
    script = tmp_path / "hooked.py"
    script.write_text(HOOK)
    ready = tmp_path / f"ready-{point}"
    ready.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, str(script), point, str(ready), *map(str, argv)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"the child finished before reaching {point!r}: {child.communicate()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached {point!r}")
        time.sleep(0.02)
    return child, ready


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)]
)
@pytest.mark.parametrize("point", ["data", "model"])
def test_a_signal_during_a_merge_removes_every_temporary_file(
    llama: Path, tmp_path: Path, signum: int, code: int, point: str
) -> None:
    lora = tmp_path / "lora" / "model.onnx"
    inject(llama, LoraConfig(rank=4, init="random", seed=1), output=lora)
    out = tmp_path / "out" / "merged.onnx"
    before = tree_hashes(tmp_path / "lora")
    child, _ = hooked_child(tmp_path, point, "merge", lora, "-o", out)
    assert [p.name for p in out.parent.iterdir() if TEMP_PATTERN.match(p.name)], "paused mid-write"
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == code, stderr
    one_line_error(stderr)
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [], "no temporary file, no lock, no output"
    assert tree_hashes(tmp_path / "lora") == before


def test_the_next_run_reclaims_what_a_killed_run_left(llama: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora" / "model.onnx"
    inject(llama, LoraConfig(rank=4, init="random", seed=1), output=lora)
    out = tmp_path / "out" / "merged.onnx"
    run_and_kill(tmp_path, "data", "merge", lora, "-o", out)  # SIGKILL: nothing can clean up
    left = [name for name in leftovers(out.parent) if TEMP_PATTERN.match(name)]
    assert left, "the killed run left its temporary data file"
    rerun = cli("merge", lora, "-o", out)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(out.parent) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.onnx", "merged.onnx.data"]


def test_only_temporary_files_of_gone_writers_are_reclaimed(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(gone.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        token = _start_token(live.pid) or 0
        files = {
            "dead": folder / f".lo-{dead_pid}-1-0123abcd.data.tmp",
            "live": folder / f".lo-{live.pid}-{token}-0123abcd.data.tmp",
            "reused_pid": folder / f".lo-{live.pid}-{token + 1 if token else 0}-0123abcd.onnx.tmp",
            "foreign": folder / f".model.onnx.data.tmp-{dead_pid}",
            "user": folder / f"lo-{dead_pid}-1-0123abcd.tmp",
        }
        for path in files.values():
            path.write_bytes(b"x")
        result = cli("inject", save(dense_model(), tmp_path / "in" / "d.onnx"), "-o", folder / "m.onnx")
        assert result.returncode == 0, result.stderr
        assert not files["dead"].exists()
        assert files["live"].exists(), "a live writer's temporary file is never touched"
        assert files["foreign"].exists() and files["user"].exists(), "only our own naming"
        if token:  # the start time tells a reused pid from the writer (Linux)
            assert not files["reused_pid"].exists()
        assert reclaim_stale(folder) == []
    finally:
        live.kill()
        live.wait()


# --- no output over an input ----------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    save(dense_model(), folder / "m.onnx")
    save(dense_model(1), folder / "ext.onnx", external=True)
    return folder


def refused(before: dict[str, str], folder: Path, *command: str | Path) -> None:
    # In-process (the CLI's own entry point): a subprocess per case would cost a Python start-up each;
    # a traceback here would be an exception out of main(), failing the test just the same.
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(part) for part in command])
    assert code == 2, (command, stdout.getvalue(), stderr.getvalue())
    one_line_error(stderr.getvalue())
    after = tree_hashes(folder)
    assert {k: after.get(k) for k in before} == before, command


def test_reports_never_replace_an_input(inputs: Path, tmp_path: Path) -> None:
    before = tree_hashes(inputs)
    m, ext = inputs / "m.onnx", inputs / "ext.onnx"
    refused(before, inputs, "validate", m, m, "--json", m)
    refused(before, inputs, "validate", ext, ext, "--json", inputs / "ext.onnx.data")
    refused(before, inputs, "validate", m, ext, "--json", inputs / "sub" / ".." / "m.onnx")
    (tmp_path / "link").symlink_to(inputs)
    refused(before, inputs, "validate", m, m, "--json", tmp_path / "link" / "m.onnx")
    refused(before, inputs, "batch", m, "-o", tmp_path / "out", "--report", m)
    refused(before, inputs, "batch", inputs, "-o", tmp_path / "out", "--junit", inputs / "ext.onnx.data")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("rank = 2\n")
    refused(before, inputs, "batch", m, "-o", tmp_path / "out", "--config", recipe, "--report", recipe)
    refused(before, inputs, "batch", m, "-o", tmp_path / "out", "--report", tmp_path / "r", "--junit",
            tmp_path / "r")  # fmt: skip
    assert recipe.read_text() == "rank = 2\n"
    assert not (tmp_path / "out").exists()


def test_adapter_files_and_folders_are_never_replaced(inputs: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    adapter = write_adapter(
        inputs / "adapter",
        {
            "base_model.model.fc2.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
            "base_model.model.fc2.lora_B.weight": rng.standard_normal((4, 2)).astype(np.float32),
        },
        target_modules=["fc2"],
    )
    slotted = tmp_path / "slotted.onnx"
    made = cli("inject", inputs / "m.onnx", "-o", slotted, "--as-inputs", "--target", "fc2", "--rank", "2")
    assert made.returncode == 0, made.stderr
    before = tree_hashes(inputs)
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    refused(before, inputs, "inject", inputs / "m.onnx", "--peft", adapter, "-o", weights)
    refused(before, inputs, "inject", inputs / "m.onnx", "--peft", adapter, "--merge", "-o", config)
    refused(before, inputs, "inject", inputs / "m.onnx", "--peft", adapter, "--as-inputs", "-o",
            tmp_path / "s.onnx", "--adapter-out", weights)  # fmt: skip
    refused(before, inputs, "export-adapter", "--peft", adapter, "--for", slotted, "-o", config,
            "--format", "safetensors")  # fmt: skip
    refused(before, inputs, "batch", inputs / "m.onnx", "-o", tmp_path / "b", "--peft", adapter,
            "--report", weights)  # fmt: skip
    # a model whose data file has the name a PEFT folder's weights take, exported into its own folder
    folder = tmp_path / "odd"
    folder.mkdir()
    onnx.save_model(dense_model(), folder / "base.onnx", save_as_external_data=True,
                    location="adapter_model.safetensors", size_threshold=0)  # fmt: skip
    inject(folder / "base.onnx", LoraConfig(rank=2, init="random"), output=folder / "lora.onnx")
    refused(
        tree_hashes(folder), folder, "export-adapter", folder / "lora.onnx", "--format", "peft", "-o", folder
    )
    # a different file in the adapter's folder is fine
    ok = cli("inject", inputs / "m.onnx", "--peft", adapter, "-o", adapter / "applied.onnx")
    assert ok.returncode == 0, ok.stderr


def test_a_numbered_data_file_of_the_input_is_never_replaced(tmp_path: Path) -> None:
    """An input whose data files include ``out.onnx.data.0``: writing ``out.onnx`` there must not replace
    that entry (the old code put a link to the input's other data file under that name)."""
    folder = tmp_path / "in"
    folder.mkdir()
    proto = dense_model()
    blobs: dict[str, bytearray] = {}
    for tensor, location in zip(proto.graph.initializer, ("a.bin", "out.onnx.data.0", "a.bin"), strict=True):
        data = onnx.numpy_helper.to_array(tensor).tobytes()
        blob = blobs.setdefault(location, bytearray())
        offset = len(blob)
        blob.extend(data)
        onnx.external_data_helper.set_external_data(tensor, location, offset, len(data))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
    for location, blob in blobs.items():
        (folder / location).write_bytes(bytes(blob))
    onnx.save_model(proto, folder / "m.onnx")
    assert locations(folder / "m.onnx") == {"a.bin", "out.onnx.data.0"}
    x = np.ones((2, 8), np.float32)
    before = tree_hashes(folder)
    refused(before, folder, "inject", folder / "m.onnx", "-o", folder / "out.onnx")
    assert tree_hashes(folder) == before
    assert validate(load_model(dense_model()), folder / "m.onnx", inputs={"x": x}, rtol=0, atol=0).ok


# --- names the file system takes --------------------------------------------------------------------


def test_the_longest_name_that_fits_works_and_a_longer_one_is_one_line(inputs: Path, tmp_path: Path) -> None:
    longest = "n" * 250 + ".onnx"  # 255 bytes: the model's temporary file and data files must fit too
    for source in ("m.onnx", "ext.onnx"):
        out = tmp_path / source / longest
        result = cli("inject", inputs / source, "-o", out, "--rank", "2", "--init", "random")
        assert result.returncode == 0, result.stderr
        assert validate(inject(inputs / source, LoraConfig(rank=2, init="random")).model, out).ok
        load_model(out)
    too_long = "n" * 251 + ".onnx"
    before = tree_hashes(inputs)
    result = cli("inject", inputs / "m.onnx", "-o", tmp_path / "x" / too_long)
    assert result.returncode == 2
    one_line_error(result.stderr, "256 bytes", "255")
    assert tree_hashes(inputs) == before and not (tmp_path / "x").exists()


# --- two writers of one output ----------------------------------------------------------------------

GATED = r"""
import os, pathlib, sys, time

ready, go, *argv = sys.argv[1:]
real_replace = os.replace


def replace(source, target, *args, **kwargs):
    if os.fspath(target).endswith(".onnx"):  # data files are in place, the model is next
        pathlib.Path(ready).write_text("paused")
        while not os.path.exists(go):
            time.sleep(0.05)
    return real_replace(source, target, *args, **kwargs)


os.replace = replace
from lora_onnx.cli.main import main

sys.exit(main(argv))
"""


def _waits_for_a_lock(pid: int) -> bool:
    return any(
        line.split()[1:2] == ["->"] and str(pid) in line.split()
        for line in Path("/proc/locks").read_text().splitlines()
    )


@pytest.mark.skipif(
    not Path("/proc/locks").exists(), reason="needs Linux /proc/locks to see the waiting writer"
)
def test_two_writers_of_one_output_are_serialised(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "lora.onnx"
    script = tmp_path / "gated.py"
    script.write_text(GATED)
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, str(script), str(ready), str(go), "inject", str(llama), "-o", str(out),
         "--rank", "2", "--init", "random", "--seed", "1"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = subprocess.Popen(
        [sys.executable, "-m", "lora_onnx", "inject", str(llama), "-o", str(out),
         "--rank", "4", "--init", "random", "--seed", "2"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The kernel lists a process waiting for a lock in /proc/locks ("->"): the second writer must get
    # there, and stay there while the first holds the output.
    deadline = time.monotonic() + 120
    while not _waits_for_a_lock(second.pid):
        assert second.poll() is None, second.communicate()
        assert time.monotonic() < deadline, "the second writer never waited for the lock"
        time.sleep(0.05)
    time.sleep(0.5)
    waited = second.poll() is None and _waits_for_a_lock(second.pid)
    go.write_text("go")
    assert first.wait(timeout=120) == 0, first.communicate()
    assert second.wait(timeout=120) == 0, second.communicate()
    assert waited, "the second writer waited for the first"
    # the result is one writer's whole model and data: the second's (it wrote last)
    expected = inject(llama, LoraConfig(rank=4, init="random", seed=2)).model
    written = load_model(out)
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert np.array_equal(written.array(name), expected.array(name))
    assert validate(expected, out, rtol=0, atol=0).ok
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "lora.onnx",
        "lora.onnx.data",
        "lora.onnx.lora.data",
    ]


@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/stat").exists(), reason="Linux fork")
def test_a_forked_writer_names_its_temporary_files_with_its_own_start_time(tmp_path: Path) -> None:
    """Batch workers fork from a server process: their temporary names must carry their own token, or a
    reclaim elsewhere would take a live worker for a gone one."""
    from lora_onnx.common.atomic import _writer_alive, temp_name

    temp_name(tmp_path / "warm.onnx")  # the parent's token is looked up (and cached) first
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its temp name, then wait to be killed
        os.write(write, temp_name(tmp_path / "m.onnx").name.encode())
        time.sleep(60)
        os._exit(0)
    try:
        name = os.read(read, 200).decode()
        match = TEMP_PATTERN.match(name)
        assert match is not None and int(match[1]) == pid
        assert int(match[2]) == _start_token(pid)
        assert _writer_alive(pid, int(match[2]))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not _writer_alive(pid, int(match[2]))
