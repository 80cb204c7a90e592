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
from lora_onnx.model.load import load_model
from lora_onnx.model.manifest import MANIFEST_KEY, PEFT_CONFIG_PREFIX, read_peft_config
from lora_onnx.model.tensors import SUB_BYTE_BITS

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


def test_every_tensor_is_checked_even_one_sharing_a_name(tmp_path: Path) -> None:
    """A Constant's tensor named like an initializer, stored behind a symlink out: still refused."""
    model = save(dense_model(1), tmp_path / "in" / "m.onnx", external=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x7f" * 4096)
    (model.parent / "link.data").symlink_to(secret)
    proto = onnx.load(model, load_external_data=False)
    hidden = onnx.TensorProto()
    hidden.CopyFrom(next(t for t in proto.graph.initializer if t.name == WEIGHT))
    for entry in hidden.external_data:
        if entry.key == "location":
            entry.value = "link.data"
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], name="c", value=hidden))
    onnx.save(proto, model)
    with pytest.raises(ModelLoadError, match="symbolic link"):
        load_model(model)


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


@pytest.mark.parametrize(
    ("model_dir", "data_dir", "loads"),
    [("blobs", "blobs", True), ("blobs", "blobs/data", True), ("model", "data", False)],
    ids=["hf-cache", "data-under-the-real-model-folder", "data-elsewhere"],
)
def test_a_linked_model_may_use_data_beside_its_real_file(
    tmp_path: Path, model_dir: str, data_dir: str, loads: bool
) -> None:
    """onnxruntime 1.32's rule for a model that is itself a symlink (a Hugging Face cache snapshot):
    the data may resolve into the model's folder or into the folder of the model's real file."""
    import onnxruntime as ort

    built = save(dense_model(1), tmp_path / "built" / "m.onnx", external=True)
    expected = numpy_helper.to_array(onnx.load(built).graph.initializer[0])
    (tmp_path / model_dir).mkdir(parents=True, exist_ok=True)
    (tmp_path / data_dir).mkdir(parents=True, exist_ok=True)
    built.rename(tmp_path / model_dir / "guid1")
    (tmp_path / "built" / "m.onnx.data").rename(tmp_path / data_dir / "guid2")
    snapshot = tmp_path / "snapshots" / "v1"
    snapshot.mkdir(parents=True)
    (snapshot / "m.onnx").symlink_to(tmp_path / model_dir / "guid1")
    (snapshot / "m.onnx.data").symlink_to(tmp_path / data_dir / "guid2")
    try:
        ort.InferenceSession(str(snapshot / "m.onnx"), providers=["CPUExecutionProvider"])
        ort_loads = True
    except Exception:  # onnxruntime's own exception types
        ort_loads = False
    assert ort_loads == loads  # the reference behaves as described
    if loads:
        np.testing.assert_array_equal(load_model(snapshot / "m.onnx").array(WEIGHT), expected)
    else:
        with pytest.raises(ModelLoadError, match="symbolic link"):
            load_model(snapshot / "m.onnx")


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
    from lora_onnx.commands.reports import REPORT_FORMAT

    bad = tmp_path / "bad.json"
    bad.write_text(text.replace("lora-onnx-batch-report", REPORT_FORMAT))
    code, stderr = run_cli(capsys, "report", "merge", bad, bad, "-o", tmp_path / "merged.json")
    assert code == 2, stderr
    one_line_error(stderr, "bad.json", needle)
    assert not (tmp_path / "merged.json").exists()


# --- property: random external_data entries and file sizes ------------------------------------------

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(
    max_examples=int(os.environ.get("LORA_ONNX_HYPOTHESIS_EXAMPLES", "60")),
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: Locations inside (w.data, sub/w.data, linked.data -> w.data), out of the folder in every way, or odd.
LOCATIONS = [
    "w.data", "./w.data", "sub/w.data", "sub//w.data", "linked.data", "out.data", "outdir/w.data", "",
    ".", "sub", "..", "../secret.data", "sub/../w.data", "/etc/hostname", "w.data\0", "missing.data",
    "w.data ", "W.DATA", "fifo",
]  # fmt: skip
NUMBERS = st.one_of(
    st.integers(0, 600).map(str),
    st.sampled_from(
        ["-1", "-0", "+4", " 4", "4 ", "0x10", "1e2", "", "abc", "4.0", "99999999999999999999", "٣"]
    ),
)
KEYS = st.one_of(st.sampled_from(["location", "offset", "length", "checksum"]), st.text(max_size=8))
ENTRY = st.one_of(
    st.tuples(st.just("location"), st.one_of(st.sampled_from(LOCATIONS), st.text(max_size=12))),
    st.tuples(st.sampled_from(["offset", "length"]), NUMBERS),
    st.tuples(KEYS, st.text(max_size=8)),
)
DTYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT4, TensorProto.DOUBLE]


def _hostile_folder(root: Path, data: bytes) -> Path:
    """``root/m/`` holding w.data (and sub/w.data, linked.data -> w.data, links leading out, a FIFO);
    ``root/secret.data`` and ``root/outdir/w.data`` outside, all of bytes 0xEE that no inside file has."""
    folder = root / "m"
    (folder / "sub").mkdir(parents=True)
    for file in (folder / "w.data", folder / "sub" / "w.data"):
        file.write_bytes(data)
    (folder / "linked.data").symlink_to("w.data")
    (root / "outdir").mkdir()
    for file in (root / "secret.data", root / "outdir" / "w.data"):
        file.write_bytes(b"\xee" * 4096)
    (folder / "out.data").symlink_to(root / "secret.data")
    (folder / "outdir").symlink_to(root / "outdir", target_is_directory=True)
    os.mkfifo(folder / "fifo")
    return folder


def _expected_read(folder: Path, tensor: onnx.TensorProto, fields: dict[str, str]) -> np.ndarray | None:
    """What a correct reader returns, or None when the entries must be refused (our own oracle, written
    from the rules: known keys once, digits only, a regular file inside the folder, length = size)."""
    from lora_onnx.model.tensors import nbytes

    location = fields.get("location")
    if not location or "\0" in location or location.startswith("/") or ".." in Path(location).parts:
        return None
    target = (folder / location).resolve()
    if not target.is_relative_to(folder.resolve()) or not target.is_file():
        return None
    numbers = {key: fields[key] for key in ("offset", "length") if key in fields}
    if any(not (value.isascii() and value.isdigit()) for value in numbers.values()):
        return None
    offset, size = int(numbers.get("offset", "0")), nbytes(tensor)
    if "length" in numbers and int(numbers["length"]) != size:
        return None
    raw = target.read_bytes()
    if offset + size > len(raw):
        return None
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = raw[offset : offset + size]
    return numpy_helper.to_array(inline)


def _save_identity_model(path: Path, tensor: onnx.TensorProto, data_type: int, shape: list[int]) -> None:
    """A model whose output is the (external) initializer ``tensor`` itself."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"], name="id")],
        "g",
        [],
        [helper.make_tensor_value_info("y", data_type, shape)],
        [tensor],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


@PROPERTY
@given(
    # weighted towards entries that can load: a valid location, a small offset, the exact length
    location=st.one_of(
        st.sampled_from(["w.data", "./w.data", "sub/w.data"]),
        st.sampled_from(LOCATIONS),
        st.text(max_size=12),
    ),
    offset=st.one_of(st.none(), st.integers(0, 64).map(str), NUMBERS),
    length=st.one_of(st.none(), st.just("exact"), NUMBERS),
    extra=st.one_of(
        st.sampled_from([(), (), (), (("checksum", "0"),)]).map(list), st.lists(ENTRY, max_size=2)
    ),
    data_type=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    file_size=st.one_of(st.just(1200), st.integers(0, 1200)),
)
def test_random_external_data_loads_exactly_or_is_refused(
    location: str,
    offset: str | None,
    length: str | None,
    extra: list[tuple[str, str]],
    data_type: int,
    shape: list[int],
    file_size: int,
) -> None:
    """Plausible entries (a location, maybe an offset, a length right or wrong) plus random extra ones."""
    from lora_onnx.model.tensors import nbytes

    probe = onnx.TensorProto()
    probe.data_type = data_type
    probe.dims.extend(shape)
    if length == "exact":
        length = str(nbytes(probe))
    entries = [("location", location)]
    entries += [(key, value) for key, value in (("offset", offset), ("length", length)) if value is not None]
    entries += extra
    import tempfile

    rng = np.random.default_rng(file_size)
    data = rng.integers(0, 0xEE, file_size, dtype=np.uint8).tobytes()  # never 0xEE: outside bytes differ
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type, tensor.data_location = "w", data_type, TensorProto.EXTERNAL
    tensor.dims.extend(shape)
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    keys = [key for key, _ in entries]
    refused_keys = len(set(keys)) != len(keys) or any(
        key not in ("location", "offset", "length", "checksum") for key in keys
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = _hostile_folder(Path(tmp), data)
        _save_identity_model(folder / "m.onnx", tensor, data_type, shape)
        expected = None if refused_keys else _expected_read(folder, tensor, dict(entries))
        try:
            loaded = load_model(folder / "m.onnx")
            value = np.asarray(loaded.array("w"))
        except LoraOnnxError:
            event("refused")
            assert expected is None, (entries, shape)
            return
        event("loaded")
        assert expected is not None, (entries, shape)  # we read something a correct reader refuses
        assert value.shape == tuple(shape) and value.dtype == expected.dtype
        assert value.tobytes() == expected.tobytes()  # bit for bit (NaN patterns included)


@PROPERTY
@given(
    location=st.sampled_from(["w.data", "./w.data", "sub/w.data", "linked.data", "sub//w.data"]),
    offset=st.integers(0, 700),
    with_length=st.booleans(),
    data_type=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    file_size=st.integers(0, 1200),
)
def test_well_formed_external_data_loads_exactly_when_the_file_holds_it(
    location: str, offset: int, with_length: bool, data_type: int, shape: list[int], file_size: int
) -> None:
    """Entries that are all well formed: the load succeeds exactly when offset + size fits the file,
    and the tensor read is the file's bytes at that offset."""
    import tempfile

    from lora_onnx.model.tensors import nbytes

    data = np.random.default_rng(file_size).integers(0, 0xEE, file_size, dtype=np.uint8).tobytes()
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type, tensor.data_location = "w", data_type, TensorProto.EXTERNAL
    tensor.dims.extend(shape)
    size = nbytes(tensor)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
        if key != "length" or with_length:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    with tempfile.TemporaryDirectory() as tmp:
        folder = _hostile_folder(Path(tmp), data)
        _save_identity_model(folder / "m.onnx", tensor, data_type, shape)
        if offset + size > file_size:
            with pytest.raises(ModelLoadError, match="is truncated: initializer 'w'"):
                load_model(folder / "m.onnx")
            return
        event("loaded")
        value = np.asarray(load_model(folder / "m.onnx").array("w"))
        expected = _expected_read(folder, tensor, {e.key: e.value for e in tensor.external_data})
        assert expected is not None and value.shape == tuple(shape)
        assert value.tobytes() == expected.tobytes()
        assert value.tobytes()[:size] == data[offset : offset + size] or data_type in SUB_BYTE_BITS


def test_sparse_tensors_are_refused_not_dropped(tmp_path: Path) -> None:
    """onnx-ir, the graph layer, holds no sparse tensors: a rewrite would lose a sparse initializer."""
    model = save(dense_model(1), tmp_path / "m.onnx")
    proto = onnx.load(model)
    values = numpy_helper.from_array(np.ones(2, np.float32), "sv")
    indices = numpy_helper.from_array(np.array([0, 1], np.int64), "si")
    proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    with pytest.raises(ModelLoadError, match=r"sparse initializer 'sv'.*dense initializer"):
        load_model(proto)
    proto.graph.ClearField("sparse_initializer")
    constant = helper.make_node(
        "Constant", [], ["c"], name="const", sparse_value=helper.make_sparse_tensor(values, indices, [4])
    )
    proto.graph.node.insert(0, constant)
    with pytest.raises(ModelLoadError, match=r"node 'const' \(Constant\) has the sparse tensor attribute"):
        load_model(proto)


def test_training_info_is_refused_not_dropped(tmp_path: Path) -> None:
    proto = onnx.load(save(dense_model(1), tmp_path / "m.onnx"))
    proto.training_info.add().algorithm.name = "step"
    with pytest.raises(ModelLoadError, match="training_info"):
        load_model(proto)
