"""``inject --mixed`` and ``merge --adapter-index`` on the command line: outputs, exit codes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import rel_err, run
from mixed_builders import run_rows
from swap_builders import mixed_feeds, mixed_model
from test_cli import assert_one_line_error, cli

from lora_onnx.cli.main import build_parser
from lora_onnx.cli.options import adapter_sources
from lora_onnx.model.load import load_model
from lora_onnx.stages.stacked import mixed_info


@pytest.mark.slow
def test_slots_files_mixed_model_and_fold_of_one_index(tmp_path: Path) -> None:
    base = tmp_path / "base.onnx"
    onnx.save(mixed_model(), base)
    slots, mixed = tmp_path / "slots.onnx", tmp_path / "mixed.onnx"
    assert cli("inject", base, "-o", slots, "--as-inputs").returncode == 0
    files = []
    for i, rank in enumerate((2, 4)):
        constant, file = tmp_path / f"c{i}.onnx", tmp_path / f"a{i}.onnx_adapter"
        made = cli(
            "inject",
            base,
            "-o",
            constant,
            "--rank",
            rank,
            "--init",
            "random",
            "--seed",
            i,
            "--exclude",
            "fc3",
        )
        assert made.returncode == 0, made.stderr
        assert cli("export-adapter", constant, "--for", slots, "-o", file).returncode == 0
        files.append((constant, file))
    sources = ("--adapter-file", files[0][1], "--adapter-file", files[1][1])
    result = cli("inject", slots, "--mixed", *sources, "--validate", "-o", mixed)
    assert result.returncode == 0, result.stderr
    assert "Added 4 mixed-batch branch(es) holding 2 adapter(s)" in result.stdout
    assert "all outputs agree" in result.stdout and mixed.exists()
    info = mixed_info(load_model(mixed))
    assert info is not None and info.adapters == (str(files[0][1]), str(files[1][1]))

    rows = [1, -1, 0]
    feeds = mixed_feeds(batch=3)
    got = run_rows(mixed, feeds, rows)
    for b, r in enumerate(rows):
        want = run(base if r < 0 else files[r][0], feeds)  # rows are independent: one full-batch run each
        assert all(rel_err(g[b : b + 1], w[b : b + 1]) <= 1e-4 for g, w in zip(got, want, strict=True))

    folded = tmp_path / "one.onnx"
    result = cli("merge", mixed, "--adapter-index", "1", "--validate", "-o", folded)
    assert result.returncode == 0, result.stderr
    assert "with adapter 1 on every row: all outputs agree" in result.stdout
    for got_out, want in zip(run(folded, feeds), run(files[1][0], feeds), strict=True):
        assert rel_err(got_out, want) <= 1e-4
    assert_one_line_error(cli("merge", mixed, "-o", tmp_path / "x.onnx"), 2, "merge --adapter-index I")
    assert_one_line_error(
        cli("merge", mixed, "--adapter-index", "2", "-o", tmp_path / "x.onnx"), 2, "there is no index 2"
    )


@pytest.mark.slow
def test_user_errors_of_inject_mixed(tmp_path: Path) -> None:
    base = tmp_path / "base.onnx"
    onnx.save(mixed_model(), base)
    out = tmp_path / "out.onnx"
    file = tmp_path / "a.npz"
    np.savez(file, x=np.ones(1))
    assert_one_line_error(
        cli("inject", base, "--adapter-file", file, "-o", out), 2, "--adapter-file needs --mixed"
    )
    assert_one_line_error(cli("inject", base, "--mixed", "-o", out), 2, "--mixed needs adapters")
    assert_one_line_error(
        cli("inject", base, "--mixed", "--as-inputs", "--adapter-file", file, "-o", out),
        2,
        "--as-inputs does not",
    )
    assert_one_line_error(
        cli("inject", base, "--mixed", "--adapter-file", tmp_path / "no.npz", "-o", out), 2, "no such file"
    )
    assert_one_line_error(cli("inject", base, "--mixed", "--adapter-file", file, "-o", out), 2, "has none")
    assert_one_line_error(cli("inject", base, "--mixed", "--peft", tmp_path, "-o", out), 2, str(tmp_path))
    assert not out.exists()


def test_peft_and_adapter_file_options_keep_their_order() -> None:
    args = build_parser().parse_args(
        ["inject", "m.onnx", "-o", "o.onnx", "--mixed", "--peft", "d1", "--adapter-file", "f", "--peft", "d2"]
    )
    assert adapter_sources(args) == [("peft", "d1"), ("file", "f"), ("peft", "d2")]
    assert adapter_sources(args, "peft") == [("peft", "d1"), ("peft", "d2")]
    assert args.peft == "d2"  # --peft still stores its last value for the single-adapter paths
    assert adapter_sources(build_parser().parse_args(["inject", "m.onnx", "-o", "o.onnx"])) == []


def test_several_peft_adapters_without_mixed_are_each_checked(tmp_path) -> None:
    # Several --peft adapters without --mixed are applied side by side (issue 12; tests/test_sd_lora_*):
    # each one must exist, and the first missing one is named.
    (tmp_path / "d1").mkdir()
    result = cli("inject", "m.onnx", "-o", tmp_path / "o.onnx", "--peft", tmp_path / "d1", "--peft", "d2")
    assert_one_line_error(result, 2, "--peft d2: no such adapter folder")
