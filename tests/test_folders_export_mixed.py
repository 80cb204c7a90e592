"""``export-adapter`` and ``inject --mixed`` on folders (issue 14): a split export (encoder_model.onnx,
decoder_model.onnx, decoder_with_past_model.onnx sharing the decoder's modules, config.json) made with
torch.onnx from tiny torch modules, and the pipeline folder of test_folders_routing.

References: PEFT's own PyTorch outputs (rel <= 1e-4), the adapter's own safetensors (the PEFT folder a
folder exports must hold PEFT's keys and tensors), and onnxruntime's ``LoraAdapter`` running the per-file
adapter files on the slotted files.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import rel_err, run, write_adapter
from safetensors.numpy import load_file
from test_folders_routing import INPUTS, pipeline  # noqa: F401  (the pipeline fixture, reused)
from torch import nn

from lora_onnx import apply_peft
from lora_onnx.adapters.files import read_adapter_file
from lora_onnx.commands.folder_exports import export_adapter_folder, export_peft_folder
from lora_onnx.commands.folder_mixed import inject_mixed_folder
from lora_onnx.commands.folders import apply_peft_folder
from lora_onnx.errors import AdapterError, OutputError

SPLIT = ("decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.q_proj(x)) * self.v_proj(x)


class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Seq2Seq(nn.Module):
    """What PEFT trains: encoder.layers.N..., decoder.layers.N..., out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Layers()
        self.decoder = Layers()
        self.out_proj = nn.Linear(8, 8)


class Decoder(nn.Module):
    """The decoder files' graph: paths decoder.layers.N... and out_proj (the encoder file's: layers.N...)."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.out_proj = model.out_proj

    def forward(self, y: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.decoder(y + enc))


class DecoderWithPast(Decoder):
    def forward(self, y: torch.Tensor, enc: torch.Tensor, past: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.out_proj(self.decoder(y + enc + past))


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 4, 8)).astype(np.float32)


FEEDS = {
    "encoder_model.onnx": {"x": _x(1)},
    "decoder_model.onnx": {"y": _x(2), "enc": _x(3)},
    "decoder_with_past_model.onnx": {"y": _x(2), "enc": _x(3), "past": _x(4)},
}


def _graphs(model: Seq2Seq) -> dict[str, nn.Module]:
    return {
        "encoder_model.onnx": model.encoder,
        "decoder_model.onnx": Decoder(model),
        "decoder_with_past_model.onnx": DecoderWithPast(model),
    }


def _torch_outputs(model: Seq2Seq) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {
            name: graph(*(torch.from_numpy(v) for v in FEEDS[name].values())).numpy()
            for name, graph in _graphs(model).items()
        }


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("split")
    torch.manual_seed(0)
    base = Seq2Seq().eval()
    folder = root / "export"
    folder.mkdir()
    for name, graph in _graphs(base).items():
        names = list(FEEDS[name])
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, tuple(torch.from_numpy(v) for v in FEEDS[name].values()), str(folder / name),
                dynamo=False, input_names=names, dynamic_axes={n: {0: "batch"} for n in names},
            )  # fmt: skip
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    expected = {"base": _torch_outputs(base)}
    adapters = {}
    # a: q / v of encoder and decoder and out_proj; b: the decoder's q_proj only (nothing in the encoder)
    for label, seed, config in (
        ("a", 1, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "out_proj"],
                            init_lora_weights=False)),
        ("b", 2, LoraConfig(r=4, lora_alpha=8, target_modules=r"decoder\.layers\.\d+\.q_proj",
                            init_lora_weights=False)),
    ):  # fmt: skip
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(base), config).eval()
        peft_model.save_pretrained(root / label)
        expected[label] = _torch_outputs(peft_model.base_model.model)
        adapters[label] = root / label
    constant = root / "constant"
    apply_peft_folder(folder, adapters["a"], constant)
    slots = root / "slots"
    apply_peft_folder(folder, adapters["a"], slots, as_inputs=True, adapter_output=root / "inject_adapters")
    return {"root": root, "folder": folder, "adapters": adapters, "expected": expected, "base": base,
            "constant": constant, "slots": slots}  # fmt: skip


def _ort_with(model: Path, adapter_file: Path | None, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        run_options.add_active_adapter(adapter)
    return session.run(None, feeds, run_options)[0]


# ----------------------------------------------------------------------------------------------------
# export-adapter --peft ADAPTER --for SLOTS_DIR


def test_one_adapter_file_per_slotted_file_equals_peft(split: dict, tmp_path: Path) -> None:
    out = tmp_path / "adapters"
    result = export_adapter_folder(peft=split["adapters"]["a"], for_folder=split["slots"], output=out)
    assert sorted(p.name for p in out.iterdir()) == [n.replace(".onnx", ".onnx_adapter") for n in SPLIT]
    taken = {file.model: file.modules for file in result.files}
    assert all(p.startswith("encoder.") for p in taken["encoder_model.onnx"])
    assert taken["decoder_model.onnx"] == taken["decoder_with_past_model.onnx"]
    assert "out_proj" in taken["decoder_model.onnx"] and len(taken["decoder_model.onnx"]) == 5
    for name in SPLIT:
        slotted = split["slots"] / name
        feeds = FEEDS[name]
        active = _ort_with(slotted, out / name.replace(".onnx", ".onnx_adapter"), feeds)
        constant = run(split["constant"] / name, feeds)[0]  # inject FOLDER --peft: constant branches
        assert rel_err(active, split["expected"]["a"][name]) <= 1e-4, name
        assert rel_err(active, constant) <= 1e-5, name
        assert rel_err(active, split["expected"]["base"][name]) > 1e-3, name  # the adapter does something
        assert rel_err(_ort_with(slotted, None, feeds), split["expected"]["base"][name]) <= 1e-5, name
        # the same tensors inject --as-inputs --adapter-out wrote for that file
        mine = read_adapter_file(out / name.replace(".onnx", ".onnx_adapter")).tensors
        theirs = read_adapter_file(split["root"] / "inject_adapters" / name.replace(".onnx", ".onnx_adapter"))
        assert mine.keys() == theirs.tensors.keys()
        assert all(np.array_equal(mine[k], theirs.tensors[k]) for k in mine)


def test_a_file_the_adapter_misses_gets_no_file(split: dict, tmp_path: Path) -> None:
    # b adapts the decoder's q_proj only: the encoder file takes nothing, the slots b misses stay empty
    out = tmp_path / "b"
    result = export_adapter_folder(peft=split["adapters"]["b"], for_folder=split["slots"], output=out)
    assert sorted(p.name for p in out.iterdir()) == ["decoder_model.onnx_adapter",
                                                     "decoder_with_past_model.onnx_adapter"]  # fmt: skip
    encoder = next(file for file in result.files if file.model == "encoder_model.onnx")
    assert encoder.output is None and "takes no module" in encoder.note
    assert any(w.startswith("encoder_model.onnx takes no module") for w in result.warnings)
    for name in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
        active = _ort_with(split["slots"] / name, out / name.replace(".onnx", ".onnx_adapter"), FEEDS[name])
        assert rel_err(active, split["expected"]["b"][name]) <= 1e-4, name


def test_constant_folder_to_adapter_files_for_the_slots(split: dict, tmp_path: Path) -> None:
    out = tmp_path / "from_constant"
    result = export_adapter_folder(split["constant"], out, for_folder=split["slots"], format="safetensors")
    assert result.format == "safetensors" and all(file.output is not None for file in result.files)
    for name in SPLIT:
        file = out / name.replace(".onnx", ".safetensors")
        tensors = read_adapter_file(file).tensors
        reference = read_adapter_file(
            split["root"] / "inject_adapters" / name.replace(".onnx", ".onnx_adapter")
        )
        assert tensors.keys() == reference.tensors.keys()
        for key, value in tensors.items():
            assert rel_err(value, reference.tensors[key]) <= 1e-6, key


def test_key_in_no_file_is_refused_naming_it(split: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    stem = "base_model.model.decoder.layers.7.q_proj"
    tensors = {
        f"{stem}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
        f"{stem}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
        "base_model.model.encoder.layers.0.q_proj.lora_A.weight": rng.standard_normal((2, 8)).astype(
            np.float32
        ),
        "base_model.model.encoder.layers.0.q_proj.lora_B.weight": rng.standard_normal((8, 2)).astype(
            np.float32
        ),
    }
    adapter = write_adapter(tmp_path / "bad", tensors, r=2, lora_alpha=2)
    out = tmp_path / "out"
    with pytest.raises(
        AdapterError, match=r"decoder\.layers\.7\.q_proj.*tried decoder_model\.onnx.*--skip-unmatched"
    ):
        export_adapter_folder(peft=adapter, for_folder=split["slots"], output=out)
    assert not out.exists()
    result = export_adapter_folder(peft=adapter, for_folder=split["slots"], output=out, skip_unmatched=True)
    assert result.skipped_keys == (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
    assert [p.name for p in out.iterdir()] == ["encoder_model.onnx_adapter"]


# ----------------------------------------------------------------------------------------------------
# export-adapter FOLDER --format peft


def _same_tensors(folder: Path, adapter: Path) -> None:
    mine = load_file(str(folder / "adapter_model.safetensors"))
    theirs = load_file(str(adapter / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert np.array_equal(value, theirs[key]), key


def test_peft_folder_from_a_split_export(split: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "peft"
    result = export_peft_folder(split["constant"], out)
    # decoder_model and decoder_with_past_model share 5 modules: written once, PEFT's own keys and tensors
    _same_tensors(out, split["adapters"]["a"])
    files = {file.model: file for file in result.files}
    assert files["decoder_with_past_model.onnx"].tensors == 0
    assert "5 module(s) equal to decoder_model.onnx's" in files["decoder_with_past_model.onnx"].note
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4
    # PEFT loads it and gives its outputs; re-applied to the folder it gives them too
    loaded = PeftModel.from_pretrained(copy.deepcopy(split["base"]), out).eval()
    for name, value in _torch_outputs(loaded.base_model.model).items():
        assert rel_err(value, split["expected"]["a"][name]) <= 1e-6, name
    again = apply_peft_folder(split["folder"], out, tmp_path / "again", validate=True)
    assert again.ok
    for name in SPLIT:
        assert rel_err(run(tmp_path / "again" / name, FEEDS[name])[0], split["expected"]["a"][name]) <= 1e-4


def test_peft_folder_refuses_a_module_with_two_values(split: dict, tmp_path: Path) -> None:
    folder = tmp_path / "mixed_up"
    shutil.copytree(split["constant"], folder)
    rng = np.random.default_rng(6)
    stem = "base_model.model.decoder.layers.0.q_proj"
    tensors = {
        f"{stem}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
        f"{stem}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
    }
    other = write_adapter(tmp_path / "other", tensors, r=2, lora_alpha=4)
    (folder / "decoder_with_past_model.onnx").unlink()
    apply_peft(split["folder"] / "decoder_with_past_model.onnx", other,
               output=folder / "decoder_with_past_model.onnx")  # fmt: skip
    with pytest.raises(
        AdapterError,
        match=r"module 'decoder\.layers\.0\.q_proj' is in decoder_model\.onnx and "
        r"decoder_with_past_model\.onnx with different tensors",
    ):
        export_peft_folder(folder, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_peft_folder_from_a_pipeline_gets_the_component_prefixes(pipeline: dict, tmp_path: Path) -> None:  # noqa: F811
    constant = tmp_path / "constant"
    apply_peft_folder(pipeline["folder"], pipeline["adapter"], constant)
    out = tmp_path / "peft"
    export_peft_folder(constant, out)
    # the text encoders' equal module paths come back under text_encoder. / text_encoder_2.: PEFT's keys
    _same_tensors(out, pipeline["adapter"])
    apply_peft_folder(pipeline["folder"], out, tmp_path / "again")
    for name, x in INPUTS.items():
        output = run(tmp_path / "again" / name / "model.onnx", {"x": x})[0]
        assert rel_err(output, pipeline["expected"][name]) <= 1e-4, name


def test_pipeline_slots_get_adapter_files_in_their_sub_folders(pipeline: dict, tmp_path: Path) -> None:  # noqa: F811
    slots = tmp_path / "slots"
    apply_peft_folder(pipeline["folder"], pipeline["adapter"], slots, as_inputs=True)
    out = tmp_path / "adapters"
    export_adapter_folder(peft=pipeline["adapter"], for_folder=slots, output=out)
    for name, x in INPUTS.items():
        file = out / name / "model.onnx_adapter"
        assert (
            rel_err(_ort_with(slots / name / "model.onnx", file, {"x": x}), pipeline["expected"][name])
            <= 1e-4
        )


# ----------------------------------------------------------------------------------------------------
# inject FOLDER --mixed


def test_mixed_folder_one_index_means_one_adapter_everywhere(split: dict, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    adapters = [split["adapters"]["a"], split["adapters"]["b"]]
    result = inject_mixed_folder(split["folder"], adapters, out, validate=True)
    assert result.ok and result.command == "inject --mixed"
    branches = {file.model: file.branches for file in result.files}
    assert branches == {"decoder_model.onnx": 5, "decoder_with_past_model.onnx": 5, "encoder_model.onnx": 4}
    # b has no module in the encoder: it keeps its index there, its rows run the encoder's base
    assert any(w.startswith("encoder_model.onnx: adapter 1") for w in result.warnings)
    assert (out / "config.json").read_text() == '{"model_type": "tiny"}'
    rows = np.array([0, 1, -1], np.int64)  # row 0: a, row 1: b, row 2: the base
    for name in SPLIT:
        got = run(out / name, {**FEEDS[name], "lora_adapter_index": rows})[0]
        for row, label in enumerate(("a", "b", "base")):
            assert rel_err(got[row], split["expected"][label][name][row]) <= 1e-4, (name, label)
        other = run(out / name, {**FEEDS[name], "lora_adapter_index": np.array([1, 0, 0], np.int64)})[0]
        assert rel_err(other[0], split["expected"]["b"][name][0]) <= 1e-4, name
    encoder = run(out / "encoder_model.onnx", {**FEEDS["encoder_model.onnx"], "lora_adapter_index": rows})[0]
    assert rel_err(encoder[1], split["expected"]["base"]["encoder_model.onnx"][1]) <= 1e-5


def test_mixed_folder_copies_files_that_take_nothing(split: dict, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    result = inject_mixed_folder(split["folder"], [split["adapters"]["b"]], out)
    encoder = next(file for file in result.files if file.model == "encoder_model.onnx")
    assert encoder.result is None and encoder.branches == 0
    assert "encoder_model.onnx carries none of the adapters' modules: written unchanged" in result.warnings
    got = run(out / "encoder_model.onnx", FEEDS["encoder_model.onnx"])[0]
    assert np.array_equal(got, run(split["folder"] / "encoder_model.onnx", FEEDS["encoder_model.onnx"])[0])
    rows = np.array([0, -1, 0], np.int64)
    got = run(out / "decoder_model.onnx", {**FEEDS["decoder_model.onnx"], "lora_adapter_index": rows})[0]
    assert rel_err(got[0], split["expected"]["b"]["decoder_model.onnx"][0]) <= 1e-4
    assert rel_err(got[1], split["expected"]["base"]["decoder_model.onnx"][1]) <= 1e-5


def test_mixed_folder_key_in_no_file(split: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    stem = "base_model.model.encoder.layers.9.v_proj"
    tensors = {
        f"{stem}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
        f"{stem}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
        "base_model.model.out_proj.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
        "base_model.model.out_proj.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
    }
    bad = write_adapter(tmp_path / "bad", tensors, r=2, lora_alpha=2)
    adapters = [split["adapters"]["a"], bad]
    with pytest.raises(AdapterError, match=r"encoder\.layers\.9\.v_proj.*--skip-unmatched"):
        inject_mixed_folder(split["folder"], adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = inject_mixed_folder(
        split["folder"], adapters, tmp_path / "out", skip_unmatched=True, validate=True
    )
    assert result.ok and result.skipped_keys == (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
    assert any("adapter 1" in w and "skipped 2 key(s)" in w for w in result.warnings)


# ----------------------------------------------------------------------------------------------------
# CLI


def _main(argv: list[str]) -> int:
    from lora_onnx.cli.main import main

    return main(argv)


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # long temporary paths stay on one line


def test_cli_export_adapter_folder(split: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "adapters", tmp_path / "report.json"
    argv = [
        "export-adapter",
        "--peft",
        str(split["adapters"]["a"]),
        "--for",
        str(split["slots"]),
        "-o",
        str(out),
    ]
    assert _main([*argv, "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert (
        "Wrote 3 adapter file(s) (onnx_adapter)" in captured.out
        and "decoder_model.onnx_adapter" in captured.out
    )
    data = json.loads(report.read_text())
    assert {f["model"]: len(f["modules"]) for f in data["files"]} == {
        "decoder_model.onnx": 5, "decoder_with_past_model.onnx": 5, "encoder_model.onnx": 4,
    }  # fmt: skip
    for name in SPLIT:
        active = _ort_with(split["slots"] / name, out / name.replace(".onnx", ".onnx_adapter"), FEEDS[name])
        assert rel_err(active, split["expected"]["a"][name]) <= 1e-4, name
    peft_out = tmp_path / "peft"
    assert _main(["export-adapter", str(split["constant"]), "--format", "peft", "-o", str(peft_out)]) == 0
    assert "Wrote PEFT adapter folder" in capsys.readouterr().out
    _same_tensors(peft_out, split["adapters"]["a"])


def test_cli_mixed_folder(split: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "mixed", tmp_path / "report.json"
    argv = ["inject", str(split["folder"]), "--mixed", "--peft", str(split["adapters"]["a"]), "--peft",
            str(split["adapters"]["b"]), "-o", str(out), "--validate", "--json", str(report)]  # fmt: skip
    assert _main(argv) == 0
    captured = capsys.readouterr()
    assert "3 of 3 model file(s) changed" in captured.err + captured.out
    assert "adapter 1" in captured.err  # the encoder note
    data = json.loads(report.read_text())
    assert data["command"] == "inject --mixed" and data["ok"]
    assert all(f["validation"] == {"proof": True} for f in data["files"])
    rows = np.array([1, 0, -1], np.int64)
    got = run(out / "decoder_with_past_model.onnx", {**FEEDS["decoder_with_past_model.onnx"],
                                                     "lora_adapter_index": rows})[0]  # fmt: skip
    assert rel_err(got[0], split["expected"]["b"]["decoder_with_past_model.onnx"][0]) <= 1e-4
    assert rel_err(got[1], split["expected"]["a"]["decoder_with_past_model.onnx"][1]) <= 1e-4


def test_cli_folder_export_and_mixed_refusals(
    split: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(8)
    stem = "base_model.model.decoder.layers.4.q_proj"
    bad = write_adapter(tmp_path / "bad", {
        f"{stem}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
        f"{stem}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
    }, r=2, lora_alpha=2)  # fmt: skip
    folder, slots, a = str(split["folder"]), str(split["slots"]), str(split["adapters"]["a"])
    out = str(tmp_path / "out")
    key = "decoder.layers.4.q_proj.lora_A.weight"
    cases = [
        (["export-adapter", "--peft", str(bad), "--for", slots, "-o", out], key),
        (["export-adapter", "--peft", a, "--for", slots, "-o", out + ".onnx_adapter"], "takes a folder"),
        (["export-adapter", "--peft", a, "--for", slots, "-o", out, "--component", "unet"], "sub-folder"),
        (["export-adapter", folder, "-o", out], "carries constant LoRA branches"),
        (["export-adapter", str(split["constant"]), "-o", out, "--skip-unmatched"], "goes with --peft"),
        (["inject", folder, "--mixed", "--peft", a, "--peft", str(bad), "-o", out], key),
        (["inject", folder, "--mixed", "--adapter-file", "x.onnx_adapter", "-o", out], "takes PEFT adapters"),
        (["inject", folder, "--mixed", "--peft", a, "--as-inputs", "-o", out], "does not apply to --mixed"),
        (["inject", folder, "--mixed", "--peft", a, "--merge", "-o", out], "does not apply to --mixed"),
        (["inject", folder, "--stacks-as-inputs", "--peft", a, "-o", out], "needs --mixed"),
        (["export-adapter", str(split["slots"] / "decoder_model.onnx"), "-o", out, "--json", "r.json"],
         "--json reports a folder export"),
    ]  # fmt: skip
    for argv, fragment in cases:
        assert _main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lora-onnx: error: ") and err.count("\n") == 1 and fragment in err, (argv, err)
    assert not Path(out).exists()
    # the unmatched key is listed and skipped with --skip-unmatched
    assert (
        _main(["inject", folder, "--mixed", "--peft", a, "--peft", str(bad), "-o", out, "--skip-unmatched"])
        == 0
    )
    assert "skipped 2 key(s)" in capsys.readouterr().err


def test_output_folder_checks(split: dict) -> None:
    with pytest.raises(OutputError, match="input folder"):
        inject_mixed_folder(split["folder"], [split["adapters"]["a"]], split["folder"] / "sub")
