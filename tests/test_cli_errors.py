"""Every user mistake on the command line: one ``lora-onnx: error:`` line, exit 2, never a traceback.

Most cases run ``lora_onnx.cli.main.main`` in-process (the message is what they test); a few run the real
command in a subprocess for the exit-code, traceback and onnxruntime-log guarantees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rng_array
from onnx import TensorProto, helper
from test_cli import BERT, assert_one_line_error, cli

from lora_onnx.cli.main import main

F = TensorProto.FLOAT


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one in-process CLI run (argparse's exits included)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors exit through parser.error
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lora-onnx: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 16-wide two-layer model with a 3-wide head (symbolic dim 'batch'), and odd files."""
    folder = tmp_path_factory.mktemp("models")
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/body/fc/MatMul"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="/head/MatMul"),
    ]
    weights = {"W1": rng_array((16, 16), 1), "W2": rng_array((16, 3), 2)}
    model = make_model(nodes, {"x": (F, ["batch", 16])}, ["y"], weights)
    paths = {"model": folder / "model.onnx", "empty": folder / "empty.onnx", "folder": folder / "adir"}
    onnx.save(model, paths["model"])
    paths["empty"].write_bytes(b"")
    paths["folder"].mkdir()
    # A model onnxruntime loads but cannot run (a Reshape to an impossible shape): its run error.
    reshape = make_model(
        [helper.make_node("Reshape", ["x", "s"], ["y"], name="bad_reshape")],
        {"x": (F, ["n", 3])}, ["y"], {"s": np.array([5, 7], np.int64)},
    )  # fmt: skip
    paths["unrunnable"] = folder / "unrunnable.onnx"
    onnx.save(reshape, paths["unrunnable"])
    np.savez(folder / "inputs.npz", x=np.ones((2, 16), np.float32))
    paths["npz"] = folder / "inputs.npz"
    return paths


#: argv (with {model}, {empty}, {folder}, {npz}, {out} placeholders) -> a fragment of the error line.
CASES = [
    (
        ["inject", "{model}", "-o", "{out}", "--seed", "-1", "--init", "random"],
        "--seed must be a whole number",
    ),
    (
        ["inject", "{model}", "-o", "{out}", "--seed", "4294967296", "--init", "random"],
        "from 0 to 4294967295, got 4294967296",
    ),
    (["validate", "{model}", "{model}", "--seed", "-1"], "--seed must be a whole number"),
    (["inject", "{model}", "-o", "{out}", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["inject", "{model}", "-o", "{out}", "--rank", "abc"], "inject: argument --rank/-r: invalid int value"),
    (["inject", "{model}", "-o", "{out}", "--rank", "0"], "--rank must be a positive whole number"),
    (["inject", "{model}", "-o", "{out}", "--rank", "-3"], "--rank must be a positive whole number"),
    (
        ["inject", "{model}", "-o", "{out}", "--rank", "100000"],
        "rank 100000 exceeds both in and out features",
    ),
    (["inject", "{model}", "-o", "{out}", "--alpha", "-1"], "--alpha must be a positive number"),
    (["inject", "{model}", "-o", "{out}", "--ops", "foo"], "--ops takes a comma list"),
    (
        ["inject", "{model}", "-o", "{out}", "--target-regex", "("],
        "--target-regex '(' is not a valid regular",
    ),
    (["inject", "{model}", "-o", "{out}", "--exclude-regex", "("], "--exclude-regex '(' is not a valid"),
    (["inject", "{model}", "-o", "{out}", "--rank-pattern", "x=abc"], "--rank-pattern takes KEY=VALUE"),
    (["inject", "{model}", "-o", "{out}", "--rank-pattern", "fc=0"], "rank_pattern['fc'] must be a positive"),
    (["inject", "{model}", "-o", "{out}", "--init", "nope"], "argument --init: invalid choice: 'nope'"),
    (["inject", "{model}", "-o", "{out}", "--name", "a b"], "adapter name 'a b'"),
    (["inspect", "{model}", "--target", "nothing_here"], "no site matches the targets (nothing_here)"),
    (["validate", "{model}", "{model}", "--providers", "foo"], "unknown provider 'foo'"),
    (["inject", "{folder}/missing.onnx", "-o", "{out}"], "missing.onnx: no such file"),
    (["inject", "{folder}", "-o", "{out}"], "is a folder, not an .onnx file"),
    (["inject", "{empty}", "-o", "{out}"], "not an ONNX model"),
    (["validate", "{empty}", "{model}"], "empty.onnx: not an ONNX model"),
    (
        ["inject", "{model}", "-o", "{folder}/x.onnx_adapter"],
        "must end in .onnx (adapter files are written by",
    ),
    (["inject", "{model}", "-o", "{folder}/x.onnx_adapter"], "name it {folder}/x.onnx"),
    (["inject", "{model}", "-o", "{folder}/model_lora"], "name it {folder}/model_lora.onnx"),
    (["merge", "{model}", "-o", "{folder}/merged.safetensors"], "name it {folder}/merged.onnx"),
    (
        ["validate", "{model}", "{model}", "--dim", "bacth=4"],
        "no input of the model has a symbolic dim 'bacth'",
    ),
    (["validate", "{model}", "{model}", "--dim", "bacth=4"], "(its symbolic dims: batch)"),
    (["validate", "{model}", "{model}", "--dim", "batch=0"], "positive whole number, got 'batch=0'"),
    (["validate", "{model}", "{model}", "--dim", "batch=-2"], "positive whole number, got 'batch=-2'"),
    (["validate", "{model}", "{model}", "--dim", "batch=2.5"], "positive whole number, got 'batch=2.5'"),
    (["validate", "{model}", "{model}", "--dim", "batch"], "--dim takes NAME=VALUE"),
    (["inject", "{model}", "-o", "{out}", "--dim", "batch=2"], "add --validate"),
    (["validate", "{model}", "{model}", "--inputs", "{npz}", "--dim", "batch=2"], "with --inputs FILE.npz"),
    (
        ["export-adapter", "{model}", "-o", "{folder}/a.npz", "--adapter-version", "-1"],
        "--adapter-version must",
    ),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    (["inject", "{model}"], "the following arguments are required: -o/--output"),
]


@pytest.mark.parametrize(("argv", "fragment"), CASES, ids=[" ".join(a[:1] + a[3:]) for a, _ in CASES])
def test_user_mistakes_are_one_error_line_with_exit_2(
    argv: list[str],
    fragment: str,
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = {**{k: str(v) for k, v in models.items()}, "out": str(tmp_path / "out.onnx")}
    code, _, err = run_main([arg.format(**values) for arg in argv], capsys)
    line = error_line(err)
    assert code == 2, err
    assert fragment.format(**values) in line, line
    assert not (tmp_path / "out.onnx").exists()
    assert not any(models["folder"].iterdir())  # no mistaken output was written next to the inputs


def test_exclude_typos_warn_like_target_typos(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.onnx"
    argv = ["inject", str(models["model"]), "-o", str(out), "--rank", "2"]
    code, _, err = run_main([*argv, "--exclude", "hed", "--exclude-regex", "body\\.nothing"], capsys)
    assert code == 0 and out.exists()
    assert (
        "warning: --exclude 'hed' matches no site, so it excludes nothing; nearest module paths: head" in err
    )
    assert "warning: --exclude-regex 'body\\.nothing' matches no module path" in err
    # A --target-regex beside --target names warns too when it selects nothing.
    code, _, err = run_main([*argv, "--target", "head", "--target-regex", "nope.*"], capsys)
    assert code == 0 and "--target-regex 'nope.*' matches no module path" in err
    # Excludes that do exclude something say nothing.
    out.unlink()
    code, _, err = run_main([*argv, "--exclude", "head", "--exclude-regex", "nothing|body\\.fc"], capsys)
    assert code == 2 and "warning" not in err  # both sites excluded: nothing is left, which is an error
    code, _, err = run_main([*argv, "--exclude", "head"], capsys)
    assert code == 0 and "warning" not in err


def test_ranks_above_min_in_out_warn_naming_the_site(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.onnx"
    argv = ["inject", str(models["model"]), "-o", str(out)]
    code, _, err = run_main([*argv, "--rank", "8"], capsys)  # head is 16 -> 3: rank 8 > 3, PEFT allows it
    assert code == 0 and out.exists()
    assert "the rank exceeds min(in, out)" in err and "head (rank 8, min 3)" in err
    assert "--rank-pattern head=3 or --exclude head" in err and "body.fc" not in err
    out.unlink()
    code, _, err = run_main([*argv, "--rank", "8", "--rank-pattern", "head=3"], capsys)
    assert code == 0 and "warning" not in err
    out.unlink()
    # Above max(16, 3) of the head (fc keeps its own rank 4): refused, naming the head alone.
    code, _, err = run_main([*argv, "--rank", "17", "--rank-pattern", "fc=4"], capsys)
    line = error_line(err)
    assert code == 2 and "rank 17 exceeds both in and out features" in line and "head (min 3, max 16)" in line
    assert "of 1 site(s)" in line and "--rank-pattern head=3" in line and not out.exists()


def test_subprocess_errors_have_no_traceback_and_no_onnxruntime_log(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.onnx"
    seed = cli("inject", models["model"], "-o", out, "--seed", "-1", "--init", "random", "--rank", "2")
    assert_one_line_error(seed, 2, "--seed must be a whole number from 0 to 4294967295, got -1")
    usage = cli("inject", models["model"], "-o", out, "--rank", "abc")
    assert_one_line_error(usage, 2, "invalid int value: 'abc'", "lora-onnx inject --help")
    assert "usage:" not in usage.stderr
    # onnxruntime's own red "[E:onnxruntime:...]" lines stay out; its error text is in our line.
    failed = cli("validate", models["unrunnable"], models["unrunnable"])
    assert_one_line_error(failed, 2, "onnxruntime failed to run", "Reshape")
    assert "[E:onnxruntime" not in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
    assert not out.exists()


def test_subprocess_bundled_model_suffix_and_dim(tmp_path: Path) -> None:
    wrong = cli("inject", BERT, "-o", tmp_path / "model_lora", "--rank", "2")
    assert_one_line_error(wrong, 2, f"name it {tmp_path / 'model_lora.onnx'}")
    dims = cli("validate", BERT, BERT, "--dim", "seq=4")
    assert_one_line_error(dims, 2, "symbolic dim 'seq'", "(its symbolic dims: batch, sequence)")
    assert not list(tmp_path.iterdir())


def test_slots_take_any_rank_but_an_adapter_out_file_is_bounded(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "slots.onnx"
    argv = ["inject", str(models["model"]), "-o", str(out), "--as-inputs", "--rank", "17"]
    code, _, err = run_main(argv, capsys)  # slot ranks are symbolic: the recipe's rank shapes nothing
    assert code == 0 and out.exists() and "warning" not in err
    out.unlink()
    code, _, err = run_main([*argv, "--adapter-out", str(tmp_path / "a.npz")], capsys)
    assert code == 2 and "rank 17 exceeds both in and out features" in error_line(err)
    assert not out.exists() and not (tmp_path / "a.npz").exists()


def test_unfoldable_shared_weight_names_each_commands_own_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One quantized initializer feeds two nodes through one DequantizeLinear; only one takes a branch.
    # A float weight would be untied (tests/test_tied_weights.py); a quantized one cannot be, so no fold
    # of it fits the other node.
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "scale"], ["W"], name="dq"),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="/a/MatMul"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="/b/MatMul"),
    ]
    codes = np.random.default_rng(0).integers(-63, 64, size=(8, 8)).astype(np.int8)
    inits = {"W_q": codes, "scale": np.array(0.1, np.float32)}
    shared = tmp_path / "in" / "shared.onnx"
    shared.parent.mkdir()
    onnx.save(make_model(nodes, {"x": (F, ["batch", 8])}, ["y"], inits), shared)
    recipe = ["--target", "a", "--init", "random", "--rank", "2"]
    code, _, err = run_main(
        ["inject", str(shared), "-o", str(tmp_path / "v.onnx"), *recipe, "--validate"], capsys
    )
    line = error_line(err)
    assert code == 2 and "shared with node '/b/MatMul'" in line
    assert "validate with --init default or gaussian" in line and "partial" not in line  # inject has none
    lora = tmp_path / "lora.onnx"
    assert run_main(["inject", str(shared), "-o", str(lora), *recipe], capsys)[0] == 0
    code, _, err = run_main(["merge", str(lora), "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "merge --partial" in error_line(err)
    code, _, err = run_main(
        ["batch", str(shared.parent), "-o", str(tmp_path / "out"), *recipe, "--merge"], capsys
    )
    assert code == 2 and "batch --merge folds every branch or fails the model" in err
    assert "merge --partial" in err and "(partial=True)" not in err
