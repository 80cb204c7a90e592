"""What the command line prints: -q / -v, the skipped-nodes summary, table widths, NO_COLOR, progress bars
on a terminal only, list options that leave positionals alone, and quiet onnxruntime sessions."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from builders import MODELS, REPO

from lora_onnx import LoraConfig, inject, merge
from lora_onnx.cli import render
from lora_onnx.cli.main import build_parser, main
from lora_onnx.cli.options import reclaim_positionals
from lora_onnx.common import progress
from lora_onnx.model.load import load_model
from lora_onnx.proofs.validation import validate
from lora_onnx.sites.find import Skipped

BERT = MODELS / "tiny_bert" / "model.onnx"
LLAMA = MODELS / "tiny_llama" / "model.onnx"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # a colour / bold / italic escape


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COLUMNS", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str | Path) -> dict:
    code, out, err = run(capsys, "inspect", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# --- argument shapes --------------------------------------------------------------------------------


def test_list_options_before_the_model_do_not_swallow_it(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")}
    spellings = [
        ("--target", "query", "value", BERT),  # the model after a multi-value list
        (BERT, "--rank", "8", "--target", "query", "value"),  # the README's order
        ("--target", "query,value", BERT),
        ("--target", "query", "--target", "value", BERT),
        ("--target", "query", "--exclude", "key", "output", BERT, "--target", "value"),
    ]
    for args in spellings:
        data = inspect_json(capsys, *args)
        assert {s["module_path"] for s in data["sites"]} == expected, args


def test_pattern_lists_split_on_commas_but_keep_regex_commas(capsys: pytest.CaptureFixture[str]) -> None:
    data = inspect_json(
        capsys, "--target", "query", "--rank-pattern", r"layer\.[0-9]{1,2}\.attention\.self\.query=2,query=4",
        "--rank-pattern", "nothing=6", BERT,
    )  # fmt: skip
    assert {s["module_path"]: s["a_shape"][1] for s in data["sites"]} == {
        "bert.encoder.layer.0.attention.self.query": 2,
        "bert.encoder.layer.1.attention.self.query": 2,
    }


def test_reclaimed_positionals_for_every_list_option() -> None:
    parser = build_parser()

    def parse(*argv: str):
        return parser.parse_args(reclaim_positionals(parser, argv))

    args = parse("batch", "--target", "q", "v", "models/", "other/", "-o", "out")
    assert args.target == ["q", "v"] and args.inputs == ["models/", "other/"]
    args = parse("validate", "--dim", "batch=3", "seq=4", "a.onnx", "b.onnx")
    assert args.dim == ["batch=3", "seq=4"] and (args.reference, args.candidate) == ("a.onnx", "b.onnx")
    args = parse("merge", "--adapter", "a,b", "c", "m.onnx", "-o", "x.onnx")
    assert args.adapter == ["a", "b", "c"] and args.model == "m.onnx"
    args = parse("inject", "-o", "x.onnx", "--alpha-pattern", "q=2", "--", "m.onnx")
    assert args.alpha_pattern == ["q=2"] and args.model == "m.onnx", "nothing moves across --"
    args = parse("inject", "m.onnx", "-o", "x.onnx", "--rank-pattern", "query")
    assert args.rank_pattern == ["query"], "a malformed item stays, to be reported as such"


@pytest.mark.parametrize("flag", ["--init", "--seed", "--name", "--alpha", "--rslora", "--alpha-pattern"])
def test_inspect_does_not_offer_options_that_change_nothing(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(BERT), flag, "x=1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert flag not in capsys.readouterr().out


def test_every_command_has_quiet_and_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [
        ("inject",), ("merge",), ("validate",), ("inspect",), ("export-adapter",), ("check-adapter",),
        ("batch",), ("report", "merge"),
    ]  # fmt: skip
    for command in commands:
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = capsys.readouterr().out
        assert "-q, --quiet" in text and "-v, --verbose" in text, command


# --- verbosity and the skipped-nodes summary --------------------------------------------------------


def test_inject_prints_a_skipped_summary_not_a_table(tmp_path: Path, capsys) -> None:
    code, out, err = run(capsys, "inject", LLAMA, "-o", tmp_path / "a.onnx")
    assert code == 0, err
    lines = out.splitlines()
    assert lines == [
        "4 MatMuls without a constant weight (in model.layers.*.self_attn): not adapted "
        "(--verbose lists them)",
        "Planned 15 LoRA branch(es), 18,944 LoRA parameters.",
        f"Wrote {tmp_path / 'a.onnx'}",
    ]
    assert err == ""


def test_verbose_lists_every_skipped_node_and_times_the_steps(tmp_path: Path, capsys) -> None:
    code, out, err = run(capsys, "inject", LLAMA, "-o", tmp_path / "a.onnx", "--validate", "-v")
    assert code == 0, err
    assert "Skipped nodes (4)" in out and "not adapted" not in out
    for node in ("node_MatMul_226", "node_scaled_dot_product_attention", "node_MatMul_402"):
        assert node in out
    assert "input 'val_222' is not a constant weight: Mul 'node_Mul_222' computes it at run time" in out
    assert re.search(r"^reading model\.onnx: \d+\.\d\d s$", err, re.M), err
    assert re.search(r"^validating in onnxruntime: \d+\.\d\d s$", err, re.M), err


def test_quiet_prints_only_the_result_line(tmp_path: Path, capsys) -> None:
    code, out, err = run(capsys, "inject", LLAMA, "-o", tmp_path / "a.onnx", "--validate", "-q")
    assert (code, out, err) == (0, f"Wrote {tmp_path / 'a.onnx'}\n", "")
    code, out, err = run(capsys, "validate", LLAMA, tmp_path / "a.onnx", "-q")
    assert (code, out, err) == (0, "Validation: all outputs agree\n", "")
    code, out, err = run(capsys, "inspect", BERT, "--target", "query", "-q")
    assert code == 0 and out.splitlines() == [
        "Totals: 2 sites, 4 skipped; LoRA params 2,048 = 2.161% of the base's 94,787"
    ]


def test_quiet_still_shows_a_failed_proof(tmp_path: Path, capsys) -> None:
    changed = tmp_path / "random.onnx"
    assert run(capsys, "inject", BERT, "-o", changed, "--init", "random", "-q")[0] == 0
    code, out, _ = run(capsys, "validate", BERT, changed, "-q")
    assert code == 1
    assert "output(s) disagree" in out and "NO" in out, "the failing comparison table is printed"


def test_inspect_lists_every_skipped_node_with_its_reason(capsys) -> None:
    code, out, _ = run(capsys, "inspect", LLAMA)
    assert code == 0
    listing = out[out.index("Skipped nodes (4)") :].splitlines()
    assert listing[1].split() == ["model.layers.0.self_attn", "MatMul", "node_MatMul_226"]
    reason = "input 'val_222' is not a constant weight: Mul 'node_Mul_222' computes it at run time"
    assert listing[2] == f"      {reason}", "one unbroken line"


def test_skipped_summary_groups_by_op_and_reason() -> None:
    rows = [
        Skipped(
            "n1", "MatMul", "enc.layer.0.attn", "input 'a' is not a constant weight: Mul 'm' computes it"
        ),
        Skipped("n2", "MatMul", "enc.layer.1.attn", "input 'b' is a graph input, not a constant weight"),
        Skipped("n3", "Conv", "stem.conv", "rank 3 is not a multiple of the conv's group 2 (...)"),
        Skipped("n4", "Gemm", "head", "input 'x': rows mix across the batch"),
        Skipped("n5", "Gemm", "tail", "input 'y': rows mix across the batch"),
    ]
    assert render.skipped_summary(rows) == (
        "2 MatMuls without a constant weight (in enc.layer.*.attn); "
        "1 Conv whose rank is not a multiple of the conv's group (in stem.conv); "
        "2 Gemms (input '…': rows mix across the batch) (in head and tail): "
        "not adapted (--verbose lists them)"
    )
    assert render.skipped_summary([]) is None


# --- widths, colour, progress bars ---------------------------------------------------------------------


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]


def test_piped_tables_are_100_columns_and_follow_COLUMNS(capsys, monkeypatch) -> None:
    code, out, _ = run(capsys, "inspect", LLAMA, "-v")  # -v: the widest table (node, weight, layout)
    assert code == 0 and table_lines(out)
    assert max(len(line) for line in table_lines(out)) == render.PIPED_WIDTH
    assert "model.layers.0.self_attn.q_proj" in out, "module paths are never folded"
    monkeypatch.setenv("COLUMNS", "70")
    code, out, _ = run(capsys, "inspect", LLAMA)
    assert code == 0 and max(len(line) for line in table_lines(out)) <= 70
    assert "│ model.layers.0.self_attn.q_proj" in out


def in_terminal(*args: str | Path, env: dict[str, str] | None = None) -> str:
    """Run the CLI with stdout, stderr and stdin on a pseudo-terminal; everything it wrote."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color", **(env or {})}
    for name in ("NO_COLOR", "COLUMNS", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        if name not in (env or {}):
            environment.pop(name, None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec, never return into pytest
        try:
            os.execve(sys.executable, [sys.executable, "-m", "lora_onnx", *map(str, args)], environment)
        finally:
            os._exit(127)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_and_none_when_piped(tmp_path: Path) -> None:
    shown = in_terminal("inject", LLAMA, "-o", tmp_path / "a.onnx", "--validate", "--init", "random")
    assert "validating in onnxruntime" in shown and "reading model.onnx" in shown and "━" in shown
    assert "Wrote" in shown
    quiet = in_terminal("inject", LLAMA, "-o", tmp_path / "b.onnx", "--validate", "-q")
    assert "validating in onnxruntime" not in quiet and "━" not in quiet
    piped = subprocess.run(
        [sys.executable, "-m", "lora_onnx", "inject", LLAMA, "-o", tmp_path / "c.onnx", "--validate"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert "validating" not in piped.stdout + piped.stderr and "\x1b[" not in piped.stdout + piped.stderr


def test_no_color_removes_all_styling(tmp_path: Path) -> None:
    styled = in_terminal("inspect", BERT)
    assert SGR.search(styled), "a terminal gets bold headers and colours"
    plain = in_terminal("inspect", BERT, env={"NO_COLOR": "1"})
    assert "LoRA sites (14)" in plain and "┏" in plain
    assert not SGR.search(plain), sorted(set(SGR.findall(plain)))


# --- the library's progress hook and quiet sessions ----------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.steps: dict[int, list] = {}

    def start(self, description: str, total: float | None, unit: str = "") -> int:
        self.steps[len(self.steps)] = [description, total, unit, 0.0, False]
        return len(self.steps) - 1

    def advance(self, task: int, amount: float) -> None:
        self.steps[task][3] += amount

    def describe(self, task: int, description: str) -> None:
        raise AssertionError("no library step renames itself")

    def finish(self, task: int) -> None:
        self.steps[task][4] = True


def test_library_reports_long_steps_only_to_an_installed_reporter(tmp_path: Path) -> None:
    lora, merged = tmp_path / "lora.onnx", tmp_path / "merged.onnx"
    inject(LLAMA, LoraConfig(rank=2, init="random"), output=lora)  # no reporter: nothing recorded
    recorder = Recorder()
    with progress.reporting(recorder):
        load_model(LLAMA)
        merge(lora, output=merged)  # folding rewrites the weights: the data file is streamed
        validate(LLAMA, merged)
    steps = {description: rest for description, *rest in recorder.steps.values()}
    size = LLAMA.stat().st_size
    assert steps["reading model.onnx"] == [size, "bytes", size, True]
    assert steps["parsing model.onnx"][3] is True
    total, unit, done, finished = steps["writing merged.onnx.data"]
    data = (tmp_path / "merged.onnx.data").stat().st_size
    assert unit == "bytes" and done == total and finished and 0.9 * data <= total <= data  # data adds padding
    assert steps["validating in onnxruntime"] == [4, "", 4, True], "two sessions and two runs"
    count = len(recorder.steps)
    load_model(LLAMA)
    assert len(recorder.steps) == count, "the reporter is gone after the with block"


def test_slot_models_start_quiet_sessions(tmp_path: Path) -> None:
    # A slot is an initializer that is also a graph input: onnxruntime warns once per slot at every
    # session start, unless the session's log level says otherwise (ours does).
    result = subprocess.run(
        [sys.executable, "-m", "lora_onnx", "inject", BERT, "-o", tmp_path / "s.onnx", "--as-inputs",
         "--init", "random", "--adapter-out", tmp_path / "a.onnx_adapter", "--validate",
         "--exclude", "classifier"],  # the default rank 8 is above the 3-class head's size: a warning
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "appears in graph inputs" not in result.stderr and result.stderr == ""
    code = f"import onnxruntime as ort; ort.InferenceSession({str(tmp_path / 's.onnx')!r})"
    check = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "appears in graph inputs" in check.stderr, "the warning the README tells users how to silence"
