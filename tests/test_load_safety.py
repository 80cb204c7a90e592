"""Reading models and their metadata safely: hostile external-data entries, symbolic links, manifests,
deeply nested JSON. Every case is one line ``lora-onnx: error: ...`` with exit 2, through the CLI, for
every command that reads a model, and nothing is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from batch_helpers import dense_model, files_under, save
from onnx import TensorProto, helper, numpy_helper

from lora_onnx import LoraConfig, inject
from lora_onnx.cli.main import main
from lora_onnx.errors import FoldError, LoraOnnxError, ModelLoadError
from lora_onnx.load import load_model
from lora_onnx.manifest import MANIFEST_KEY, PEFT_CONFIG_PREFIX, read_peft_config

WEIGHT = "fc1.weight"  # 8 x 8 float32: 256 bytes at offset 0 of m.onnx.data


def one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lora-onnx: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def set_entries(model: Path, name: str, edit: Callable[[dict[str, str]], list[tuple[str, str]]]) -> None:
    """Rewrite the external_data entries of tensor ``name`` in the saved ``model`` (graph only)."""
    proto = onnx.load(model, load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    entries = edit({entry.key: entry.value for entry in tensor.external_data})
    del tensor.external_data[:]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, model)


def entries(**changes: str | None) -> Callable[[dict[str, str]], list[tuple[str, str]]]:
    def edit(current: dict[str, str]) -> list[tuple[str, str]]:
        for key, value in changes.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        return list(current.items())

    return edit


def _folder(model: Path) -> None:
    (model.parent / "adir").mkdir()
    set_entries(model, WEIGHT, entries(location="adir"))


def _link_out(model: Path) -> None:
    secret = model.parent.parent / "secret.bin"
    secret.write_bytes(b"\x7f" * 4096)
    (model.parent / "link.data").symlink_to(secret)
    set_entries(model, WEIGHT, entries(location="link.data"))


def _linked_subfolder(model: Path) -> None:
    outside = model.parent.parent / "elsewhere"
    outside.mkdir()
    (outside / "w.data").write_bytes(b"\x7f" * 4096)
    (model.parent / "sub").symlink_to(outside, target_is_directory=True)
    set_entries(model, WEIGHT, entries(location="sub/w.data"))


def _short_without_length(model: Path) -> None:
    size = (model.parent / "m.onnx.data").stat().st_size
    set_entries(model, WEIGHT, entries(offset=str(size - 100), length=None))


def _duplicate_key(model: Path) -> None:
    set_entries(model, WEIGHT, lambda current: [*current.items(), ("location", "other.data")])


#: case -> (how to break the saved model, what the one line must say besides the tensor's name)
HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "folder": (_folder, "'adir' is a folder"),
    "empty-location": (
        lambda m: set_entries(m, WEIGHT, entries(location="")),
        "empty external data location",
    ),
    "dot": (lambda m: set_entries(m, WEIGHT, entries(location=".")), "'.' is a folder"),
    "absolute": (lambda m: set_entries(m, WEIGHT, entries(location="/etc/hostname")), "outside the model"),
    "dotdot": (lambda m: set_entries(m, WEIGHT, entries(location="../m.onnx.data")), "outside the model"),
    "nul": (lambda m: set_entries(m, WEIGHT, entries(location="m.onnx.data\0x")), "NUL byte"),
    "negative-offset": (lambda m: set_entries(m, WEIGHT, entries(offset="-8")), "offset '-8'"),
    "text-offset": (lambda m: set_entries(m, WEIGHT, entries(offset="abc")), "offset 'abc'"),
    "signed-offset": (lambda m: set_entries(m, WEIGHT, entries(offset="+0")), "offset '+0'"),
    "negative-length": (lambda m: set_entries(m, WEIGHT, entries(length="-256")), "length '-256'"),
    "no-location": (lambda m: set_entries(m, WEIGHT, entries(location=None)), "no 'location'"),
    "length-too-small": (lambda m: set_entries(m, WEIGHT, entries(length="100")), "length 100"),
    "length-too-large": (lambda m: set_entries(m, WEIGHT, entries(length="300")), "takes 256 bytes"),
    "short-without-length": (_short_without_length, "is truncated"),
    "symlink-out": (_link_out, "symbolic link"),
    "symlinked-subfolder": (_linked_subfolder, "symbolic link"),
    "unknown-key": (lambda m: set_entries(m, WEIGHT, entries(basepath="/")), "unknown external_data key"),
    "duplicate-key": (_duplicate_key, "'location' twice"),
}


def commands(model: Path, out: Path) -> dict[str, list[str | os.PathLike]]:
    return {
        "inject": ["inject", model, "-o", out / "i.onnx"],
        "merge": ["merge", model, "-o", out / "m.onnx"],
        "validate": ["validate", model, model],
        "inspect": ["inspect", model],
        "export-adapter": ["export-adapter", model, "-o", out / "a.onnx_adapter"],
        "check-adapter": ["check-adapter", model, out / "none.onnx_adapter"],
        "batch": ["batch", model, "-o", out / "batch"],
    }


COMMANDS = list(commands(Path(), Path()))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_external_data_is_one_line_for_every_command(
    tmp_path: Path, case: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save(dense_model(1), tmp_path / "in" / "m.onnx", external=True)
    breaker, needle = HOSTILE[case]
    breaker(model)
    out = tmp_path / "out"
    code, stderr = run_cli(capsys, *commands(model, out)[command])
    assert code == 2, stderr
    one_line_error(stderr, f"'{WEIGHT}'", needle)
    assert "onnxruntime cannot load" not in stderr  # refused by our own check, before onnxruntime
    assert files_under(out) == [] or (command == "batch" and not list(out.rglob("*.onnx")))


def test_hostile_messages_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Where a file is involved the line names it, and never blames the output path."""
    for case, file in (("folder", "adir"), ("length-too-small", "m.onnx.data"), ("symlink-out", "link.data")):
        model = save(dense_model(1), tmp_path / case / "m.onnx", external=True)
        HOSTILE[case][0](model)
        out = tmp_path / case / "out"
        code, stderr = run_cli(capsys, "inject", model, "-o", out / "i.onnx")
        assert code == 2
        one_line_error(stderr, file)
        assert "i.onnx" not in stderr


def test_a_symlink_out_of_the_folder_is_neither_linked_nor_copied(tmp_path: Path) -> None:
    model = save(dense_model(1), tmp_path / "in" / "m.onnx", external=True)
    _link_out(model)
    secret = tmp_path / "secret.bin"
    for command in (
        ["inject", model, "-o", tmp_path / "o1" / "i.onnx"],
        ["merge", model, "-o", tmp_path / "o2" / "m.onnx"],
    ):
        assert main([str(arg) for arg in command]) == 2
    assert secret.stat().st_nlink == 1  # inject used to hard-link it into the output folder
    for folder in (tmp_path / "o1", tmp_path / "o2"):
        for name in files_under(folder):
            assert b"\x7f" * 256 not in (folder / name).read_bytes()


def _data_behind_links(model: Path, *, subfolder: bool) -> None:
    """Move the data file into ``store/`` inside the folder and leave a relative symlink in its place
    (or, with ``subfolder``, link ``sub`` -> ``store`` and point every tensor there)."""
    folder = model.parent
    (folder / "store").mkdir()
    (folder / "m.onnx.data").rename(folder / "store" / "m.onnx.data")
    if subfolder:
        (folder / "sub").symlink_to("store", target_is_directory=True)
        proto = onnx.load(model, load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "sub/m.onnx.data"
        onnx.save(proto, model)
    else:
        (folder / "m.onnx.data").symlink_to("store/m.onnx.data")


@pytest.mark.parametrize("subfolder", [False, True], ids=["file-link", "folder-link"])
def test_symlinks_inside_the_folder_are_followed_as_onnxruntime_does(
    tmp_path: Path, subfolder: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """onnxruntime 1.32 loads data behind a symlink that stays inside the model's folder; so do we."""
    import onnxruntime as ort

    model = save(dense_model(1), tmp_path / "in" / "m.onnx", external=True)
    expected = numpy_helper.to_array(onnx.load(model).graph.initializer[0])
    _data_behind_links(model, subfolder=subfolder)
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])  # the reference accepts it
    loaded = load_model(model)
    np.testing.assert_array_equal(loaded.array(WEIGHT), expected)
    code, stderr = run_cli(capsys, "merge", model, "-o", tmp_path / "o" / "m.onnx")
    assert code == 2 and "no lora-onnx branches" in stderr  # loaded fine; merge needs branches
    code, stderr = run_cli(capsys, "inspect", model)
    assert code == 0, stderr


def test_data_after_load_is_checked_again_when_read(tmp_path: Path) -> None:
    """The file can change between load and read: the read refuses, it does not map past the end."""
    model = save(dense_model(1), tmp_path / "m.onnx", external=True)
    loaded = load_model(model)
    (tmp_path / "m.onnx.data").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"is truncated: initializer '{WEIGHT}'"):
        loaded.array(WEIGHT)
    (tmp_path / "m.onnx.data").unlink()
    (tmp_path / "m.onnx.data").symlink_to(tmp_path.parent)
    with pytest.raises(ModelLoadError, match="symbolic link"):
        loaded.array(WEIGHT)


def _external_model(folder: Path, tensor: onnx.TensorProto, raw: bytes, *, length: int | None) -> Path:
    """A one-Identity model whose only initializer ``tensor`` lives in ``w.data`` (holding ``raw``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.data").write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", "0"), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    graph = helper.make_graph(
        [helper.make_node("Identity", [tensor.name], ["y"], name="id")],
        "g",
        [],
        [helper.make_tensor_value_info("y", tensor.data_type, list(tensor.dims))],
        [tensor],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    onnx.save(proto, folder / "m.onnx")
    return folder / "m.onnx"


@pytest.mark.parametrize("data_type", [TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1])
def test_packed_4_bit_tensors_take_half_a_byte_per_value(tmp_path: Path, data_type: int) -> None:
    values = np.array([[1, 2, 3], [4, 5, 6], [7, 0, 1]]).astype(helper.tensor_dtype_to_np_dtype(data_type))
    tensor = numpy_helper.from_array(values, "w")
    raw = tensor.raw_data
    assert len(raw) == 5  # 9 values, two per byte
    model = _external_model(tmp_path / "ok", tensor, raw, length=5)
    np.testing.assert_array_equal(load_model(model).array("w"), values)
    wrong = numpy_helper.from_array(values, "w")
    with pytest.raises(ModelLoadError, match=r"length 9 .* takes 5 bytes"):
        load_model(_external_model(tmp_path / "bad", wrong, raw + bytes(4), length=9))


def test_string_tensors_cannot_be_external(tmp_path: Path) -> None:
    tensor = helper.make_tensor("s", TensorProto.STRING, [2], [b"ab", b"cd"])
    tensor.ClearField("string_data")
    with pytest.raises(ModelLoadError, match=r"'s'.*no fixed byte size"):
        load_model(_external_model(tmp_path, tensor, b"abcd", length=None))


def test_sparse_external_data_is_refused(tmp_path: Path) -> None:
    model = save(dense_model(1), tmp_path / "m.onnx", external=True)
    proto = onnx.load(model, load_external_data=False)
    values = numpy_helper.from_array(np.ones(2, np.float32), "sv")
    values.ClearField("raw_data")
    values.data_location = TensorProto.EXTERNAL
    entry = values.external_data.add()
    entry.key, entry.value = "location", "../../etc/hostname"
    indices = numpy_helper.from_array(np.array([0, 1], np.int64), "si")
    proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    onnx.save(proto, model)
    with pytest.raises(ModelLoadError, match="sparse initializer stores tensor 'sv' as external data"):
        load_model(model)


# --- the manifest lora-onnx keeps in metadata_props -------------------------------------------------


def _injected(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "lora.onnx"
    inject(save(dense_model(2), tmp_path / "base.onnx"), LoraConfig(rank=2), output=path)
    return path


def _edit_metadata(path: Path, key: str, edit: Callable[[str], str]) -> None:
    proto = onnx.load(path, load_external_data=False)
    entry = next(e for e in proto.metadata_props if e.key == key)
    entry.value = edit(entry.value)
    onnx.save(proto, path)


def _edit_first_branch(change: Callable[[dict[str, object]], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        data = json.loads(text)
        change(data["branches"][0])
        return json.dumps(data)

    return edit


DEEP = "[" * 100_000 + "]" * 100_000

#: case -> (new manifest text from the old, what the one line must say)
MANIFESTS: dict[str, tuple[Callable[[str], str], str]] = {
    "not-json": (lambda text: text[:-3], "unreadable"),
    "a-list": (lambda text: "[]", 'a "branches" list'),
    "branches-a-string": (lambda text: '{"version": 1, "branches": "x"}', 'a "branches" list'),
    "record-a-number": (lambda text: '{"version": 1, "branches": [3]}', "must be an object"),
    "deep": (lambda text: DEEP, "nested deeper"),
    "newer-version": (lambda text: text.replace('"version":1', '"version":99'), "version 99"),
    "rank-a-string": (_edit_first_branch(lambda b: b.update(rank="2")), "'rank' must be a whole number"),
    "scale-nan": (_edit_first_branch(lambda b: b.update(scale=float("nan"))), "'scale' must be a finite"),
    "nodes-not-names": (_edit_first_branch(lambda b: b.update(nodes=[1, 2])), "'nodes' must be a list"),
    "zero-init-a-string": (
        _edit_first_branch(lambda b: b.update(zero_init="no")),
        "'zero_init' must be true",
    ),
    "missing-field": (_edit_first_branch(lambda b: b.pop("a")), "no 'a'"),
    "missing-tensor": (_edit_first_branch(lambda b: b.update(b="no_such_tensor")), "'no_such_tensor'"),
    "missing-node": (_edit_first_branch(lambda b: b.update(nodes=["gone", *b["nodes"]])), "node 'gone'"),
}
MANIFEST_COMMANDS = ("merge", "inspect", "export-adapter", "check-adapter", "inject")


@pytest.mark.parametrize("command", MANIFEST_COMMANDS)
@pytest.mark.parametrize("case", list(MANIFESTS))
def test_broken_manifest_is_one_line(
    tmp_path: Path, case: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _injected(tmp_path)
    edit, needle = MANIFESTS[case]
    _edit_metadata(model, MANIFEST_KEY, edit)
    out = tmp_path / "out"
    argv = {
        "merge": ["merge", model, "-o", out / "m.onnx"],
        "inspect": ["inspect", model],
        "export-adapter": ["export-adapter", model, "-o", out / "a.safetensors", "--format", "peft"],
        "check-adapter": ["check-adapter", model, out / "none.onnx_adapter"],
        "inject": ["inject", model, "--name", "second", "-o", out / "i.onnx"],
    }[command]
    code, stderr = run_cli(capsys, *argv)
    assert code == 2, stderr
    one_line_error(stderr, "lora.onnx", MANIFEST_KEY, needle)
    assert files_under(out) == []


def test_manifest_naming_missing_parts_is_a_fold_error(tmp_path: Path) -> None:
    model = _injected(tmp_path)
    _edit_metadata(model, MANIFEST_KEY, MANIFESTS["missing-tensor"][0])
    with pytest.raises(FoldError, match="not in the graph as recorded"):
        load_model(model)
    assert load_model(model, check_manifest=False).proto.metadata_props  # validate does not need it


def test_peft_config_metadata_must_be_an_object(tmp_path: Path) -> None:
    proto = onnx.load(_injected(tmp_path), load_external_data=False)
    entry = proto.metadata_props.add()
    entry.key, entry.value = PEFT_CONFIG_PREFIX + "default", "[1, 2]"
    with pytest.raises(LoraOnnxError, match="expected a JSON object"):
        read_peft_config(proto, "default")
    entry.value = DEEP
    with pytest.raises(LoraOnnxError, match="nested deeper"):
        read_peft_config(proto, "default")


# --- JSON the user hands us: adapter_config.json, --config recipes, batch reports -------------------


def _peft_folder(tmp_path: Path, config_text: str) -> Path:
    from builders import write_adapter

    rng = np.random.default_rng(0)
    folder = write_adapter(
        tmp_path / "adapter",
        {
            "base_model.model.fc1.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
            "base_model.model.fc1.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
        },
    )
    (folder / "adapter_config.json").write_text(config_text)
    return folder


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (DEEP, "nested deeper"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested deeper"),
        ("[1, 2]", "expected a JSON object"),
        ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": "false"}', "use_rslora must be true"),
        ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": 1}', "use_dora must be true"),
        ('{"peft_type": "LORA", "r": "2", "lora_alpha": 4}', "r must be a positive whole number"),
        (
            '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": [1]}',
            "rank_pattern must be an object",
        ),
    ],
    ids=[
        "deep-list",
        "deep-object",
        "not-an-object",
        "rslora-string",
        "dora-number",
        "rank-string",
        "pattern",
    ],
)
def test_hostile_adapter_config_is_one_line(
    tmp_path: Path, config: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save(dense_model(0), tmp_path / "m.onnx")
    adapter = _peft_folder(tmp_path, config)
    code, stderr = run_cli(capsys, "inject", model, "--peft", adapter, "-o", tmp_path / "out" / "o.onnx")
    assert code == 2, stderr
    one_line_error(stderr, "adapter_config.json", needle)
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("deep.json", DEEP, "nested deeper"),
        ("deep.toml", "x = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper"),
        ("list.json", "[1]", "expected a table"),
        ("rank.json", '{"rank": "4"}', "'rank' must be a whole number"),
        ("digits.json", '{"rank": ' + "9" * 5000 + "}", "not a readable recipe"),
    ],
)
def test_hostile_recipe_is_one_line(
    tmp_path: Path, name: str, text: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save(dense_model(0), tmp_path / "m.onnx")
    recipe = tmp_path / name
    recipe.write_text(text)
    code, stderr = run_cli(capsys, "batch", model, "--config", recipe, "-o", tmp_path / "out" / "b")
    assert code == 2, stderr
    one_line_error(stderr, name, needle)
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (DEEP, "nested deeper"),
        ('{"format": "lora-onnx-batch-report", "version": "one", "models": []}', "not a whole number"),
        (
            '{"format": "lora-onnx-batch-report", "version": 1, "models": [], "summary": "x"}',
            "malformed report",
        ),
        ('{"format": "lora-onnx-batch-report", "version": 1, "models": "abc"}', "malformed report"),
    ],
    ids=["deep", "version-text", "summary-text", "models-text"],
)
def test_hostile_report_is_one_line(
    tmp_path: Path, text: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lora_onnx.reports import REPORT_FORMAT

    bad = tmp_path / "bad.json"
    bad.write_text(text.replace("lora-onnx-batch-report", REPORT_FORMAT))
    code, stderr = run_cli(capsys, "report", "merge", bad, bad, "-o", tmp_path / "merged.json")
    assert code == 2, stderr
    one_line_error(stderr, "bad.json", needle)
    assert not (tmp_path / "merged.json").exists()
