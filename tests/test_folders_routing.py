"""Pipeline folders (diffusers layout: unet/, text_encoder/, text_encoder_2/ each with model.onnx): a key's
component prefix sends it to that component's model only; text_encoder. and text_encoder_2. never cross;
keys without a component prefix go to every file that has the module; side files are copied.

The components are tiny torch modules exported with torch.onnx (TorchScript); the reference is PEFT itself,
on a module holding the three components under those names.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import rel_err, run, write_adapter
from torch import nn

from lora_onnx.adapters.folders import find_models
from lora_onnx.commands.folders import apply_peft_folder, merge_folder
from lora_onnx.errors import AdapterError, OutputError


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


class TextEncoder(nn.Module):
    """The same module names in both text encoders, as in SDXL's CLIP pair."""

    def __init__(self) -> None:
        super().__init__()
        self.text_model = Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_model(x)


class Unet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_in(x)
        return self.proj(y.permute(0, 2, 3, 1))


class Pipeline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unet = Unet()
        self.text_encoder = TextEncoder()
        self.text_encoder_2 = TextEncoder()


INPUTS = {
    "unet": np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32),
    "text_encoder": np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32),
    "text_encoder_2": np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32),
}
SIDE = {
    "model_index.json": '{"_class_name": "StableDiffusionXLPipeline"}',
    "scheduler/scheduler_config.json": '{"num_train_timesteps": 1000}',
    "tokenizer/vocab.json": '{"a": 0}',
    "text_encoder/config.json": '{"hidden_size": 8}',
}


def _export(module: nn.Module, x: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x),), str(path), dynamo=False, input_names=["x"])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    base = Pipeline().eval()
    folder = root / "sdxl"
    for name, x in INPUTS.items():
        _export(getattr(base, name), x, folder / name / "model.onnx")
    for name, text in SIDE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with torch.no_grad():
        expected_base = {name: getattr(base, name)(torch.from_numpy(x)).numpy() for name, x in INPUTS.items()}
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config).eval()
    peft_model.save_pretrained(root / "adapter")
    inner = peft_model.base_model.model
    with torch.no_grad():
        expected = {name: getattr(inner, name)(torch.from_numpy(x)).numpy() for name, x in INPUTS.items()}
    return {"root": root, "folder": folder, "adapter": root / "adapter", "expected": expected,
            "base": expected_base}  # fmt: skip


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    return {name: run(folder / name / "model.onnx", {"x": x})[0] for name, x in INPUTS.items()}


def test_find_models_pipeline_layout(pipeline: dict) -> None:
    found = find_models(pipeline["folder"])
    assert found.models == ("text_encoder/model.onnx", "text_encoder_2/model.onnx", "unet/model.onnx")
    assert found.components == ("text_encoder", "text_encoder_2", "unet") and found.pipeline
    assert set(found.side_files) == set(SIDE)


def test_prefixed_keys_go_to_their_component_only(pipeline: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = apply_peft_folder(pipeline["folder"], pipeline["adapter"], out, validate=True)
    assert result.ok
    taken = {file.model: file.modules for file in result.files}
    assert all(p.startswith("text_encoder.") for p in taken["text_encoder/model.onnx"])
    assert all(p.startswith("text_encoder_2.") for p in taken["text_encoder_2/model.onnx"])
    assert set(taken["unet/model.onnx"]) == {"unet.proj"}
    outputs = _outputs(out)
    for name, expected in pipeline["expected"].items():
        assert rel_err(outputs[name], expected) <= 1e-4, name
        assert rel_err(outputs[name], pipeline["base"][name]) > 1e-3, name  # the adapter changes each one
    # the two text encoders took different adapters (same module names, different tensors)
    assert rel_err(outputs["text_encoder"], outputs["text_encoder_2"]) > 1e-3
    for name, text in SIDE.items():
        assert (out / name).read_text() == text

    merged = merge_folder(out, tmp_path / "merged", validate=True)
    assert merged.ok and sum(file.branches for file in merged.files) == 2 * 4 + 1
    folded = _outputs(tmp_path / "merged")
    for name, expected in pipeline["expected"].items():
        assert rel_err(folded[name], expected) <= 1e-4, name
    assert (tmp_path / "merged" / "scheduler" / "scheduler_config.json").is_file()


def test_text_encoder_2_keys_never_reach_text_encoder(pipeline: dict, tmp_path: Path) -> None:
    # A folder without text_encoder_2: its keys would match text_encoder's module paths once the prefix
    # is dropped as a wrapper; they must match nothing instead.
    folder = tmp_path / "sd"
    shutil.copytree(pipeline["folder"], folder, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(AdapterError, match=r"pipeline component 'text_encoder_2'.*--skip-unmatched"):
        apply_peft_folder(folder, pipeline["adapter"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = apply_peft_folder(folder, pipeline["adapter"], tmp_path / "out", skip_unmatched=True)
    assert result.skipped_keys and all(
        k.startswith("base_model.model.text_encoder_2.") for k in result.skipped_keys
    )
    assert len(result.skipped_keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any("--skip-unmatched" in w for w in result.warnings)
    outputs = {name: run(tmp_path / "out" / name / "model.onnx", {"x": INPUTS[name]})[0]
               for name in ("text_encoder", "unet")}  # fmt: skip
    for name, output in outputs.items():
        assert rel_err(output, pipeline["expected"][name]) <= 1e-4, name


def test_unprefixed_keys_go_to_every_file_that_has_them(pipeline: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    stem = "base_model.model.text_model.layers.1.q_proj"
    tensors = {
        f"{stem}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
        f"{stem}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
    }
    adapter = write_adapter(tmp_path / "adapter", tensors, r=2, lora_alpha=2)
    result = apply_peft_folder(pipeline["folder"], adapter, tmp_path / "out")
    branches = {file.model: file.branches for file in result.files}
    assert branches == {"text_encoder/model.onnx": 1, "text_encoder_2/model.onnx": 1, "unet/model.onnx": 0}
    # the unet is written unchanged
    unet = [
        run(folder / "unet" / "model.onnx", {"x": INPUTS["unet"]})[0]
        for folder in (tmp_path / "out", pipeline["folder"])
    ]
    assert np.array_equal(*unet)


def test_several_model_files_in(pipeline: dict, tmp_path: Path) -> None:
    files = [pipeline["folder"] / "text_encoder" / "model.onnx", pipeline["folder"] / "unet" / "model.onnx"]
    with pytest.raises(AdapterError, match=r"text_encoder_2"):
        apply_peft_folder(files, pipeline["adapter"], tmp_path / "out")
    result = apply_peft_folder(files, pipeline["adapter"], tmp_path / "out", skip_unmatched=True)
    assert [file.model for file in result.files] == ["text_encoder/model.onnx", "unet/model.onnx"]
    assert result.copied == ()  # files given one by one: only they are written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["text_encoder", "unet"]


def test_output_folder_inside_the_input_is_refused(pipeline: dict) -> None:
    for target in (pipeline["folder"], pipeline["folder"] / "out"):
        with pytest.raises(OutputError, match="input folder"):
            apply_peft_folder(pipeline["folder"], pipeline["adapter"], target)


def test_cli_pipeline_folder(pipeline: dict, tmp_path: Path) -> None:
    from lora_onnx.cli.main import main

    report = tmp_path / "report.json"
    code = main(["inject", str(pipeline["folder"]), "--peft", str(pipeline["adapter"]), "-o",
                 str(tmp_path / "out"), "--merge", "--json", str(report), "-q"])  # fmt: skip
    assert code == 0
    data = json.loads(report.read_text())
    assert data["command"] == "inject --peft --merge"
    assert {f["model"]: f["branches"] for f in data["files"]} == {
        "text_encoder/model.onnx": 4, "text_encoder_2/model.onnx": 4, "unet/model.onnx": 1,
    }  # fmt: skip
    assert {Path(p).relative_to(tmp_path / "out").as_posix() for p in data["copied"]} == set(SIDE)
    outputs = _outputs(tmp_path / "out")
    for name, expected in pipeline["expected"].items():
        assert rel_err(outputs[name], expected) <= 1e-4, name
    # recipe flags make no sense on a folder: one line, exit 2
    assert main(["inject", str(pipeline["folder"]), "-o", str(tmp_path / "x")]) == 2
    assert main(["inject", str(pipeline["folder"]), "--peft", str(pipeline["adapter"]), "-o",
                 str(tmp_path / "y"), "--target", "q_proj"]) == 2  # fmt: skip


def test_one_file_never_takes_two_dropped_prefixes(tmp_path: Path) -> None:
    # An encoder-only folder whose paths are layers.N...: encoder.layers.0 and decoder.layers.1 would both
    # fit once their first part is dropped; which part the file is cannot be told, so it is refused.
    folder = tmp_path / "export"
    _export(Layers().eval(), INPUTS["text_encoder"], folder / "encoder_model.onnx")
    (folder / "config.json").write_text("{}")
    rng = np.random.default_rng(4)
    tensors = {}
    for part, layer in (("encoder", 0), ("decoder", 1)):
        stem = f"base_model.model.{part}.layers.{layer}.q_proj"
        tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((2, 8)).astype(np.float32)
        tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
    adapter = write_adapter(tmp_path / "adapter", tensors, r=2, lora_alpha=2)
    with pytest.raises(AdapterError, match=r"encoder_model\.onnx would take modules of two different parts"):
        apply_peft_folder(folder, adapter, tmp_path / "out")


def test_cli_folder_refusals(pipeline: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lora_onnx.cli.main import main

    folder, adapter, out = str(pipeline["folder"]), str(pipeline["adapter"]), str(tmp_path / "out")
    cases = [
        (
            ["inject", folder, "--mixed", "--adapter-file", "a.onnx_adapter", "-o", out],
            "--mixed takes PEFT adapters",
        ),
        (["inject", folder, "--peft", adapter, "-o", out, "--base-weights", "w.safetensors"], "one by one"),
        (["inject", folder, "--peft", adapter, "-o", out, "--merge", "--as-inputs"], "exclude each other"),
        (["inject", folder, "--peft", adapter, "-o", out + ".onnx"], "not to one .onnx file"),
        (["merge", folder, "-o", out], "no model file of"),
        (
            ["merge", folder, "-o", out, "--adapter-file", "a.onnx_adapter"],
            "merge such model files one by one",
        ),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lora-onnx: error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_cli_several_model_files(
    pipeline: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_onnx.cli.main import main

    monkeypatch.setenv("COLUMNS", "1000")  # a wide table: module paths on one line

    files = [str(pipeline["folder"] / name / "model.onnx") for name in ("text_encoder", "unet")]
    argv = ["inject", *files, "--peft", str(pipeline["adapter"]), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pipeline component 'text_encoder_2'" in err and "--skip-unmatched" in err
    assert main([*argv, "--skip-unmatched", "-v"]) == 0
    captured = capsys.readouterr()
    assert "skipped 8 adapter key(s) of 4 module(s) no model file has" in captured.err
    # --verbose lists every module a file took
    assert "text_encoder.text_model.layers.1.v_proj" in captured.out
    outputs = {name: run(tmp_path / "out" / name / "model.onnx", {"x": INPUTS[name]})[0]
               for name in ("text_encoder", "unet")}  # fmt: skip
    for name, output in outputs.items():
        assert rel_err(output, pipeline["expected"][name]) <= 1e-4, name
