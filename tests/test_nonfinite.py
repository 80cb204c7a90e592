"""NaN / Inf are never agreement: the comparison rule, every proof, adapter tensors refused at load, and
numeric options (strength, tolerances, alpha) that must be finite. Tiny inline models; no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rng_array, write_adapter
from onnx import TensorProto, helper
from test_cli import assert_one_line_error, cli

from lora_onnx import LoraConfig, apply_peft, inject, inject_mixed, merge, validate
from lora_onnx.adapters.files import read_adapter_file, write_adapter_file
from lora_onnx.adapters.peft.tensors import SafetensorsFile
from lora_onnx.cli.main import main
from lora_onnx.commands.batch import BatchOptions, run_batch
from lora_onnx.commands.swap import export_adapter, inject_slots
from lora_onnx.errors import AdapterError, LoraOnnxError
from lora_onnx.proofs.validation import compare

F = TensorProto.FLOAT
A_KEY, B_KEY = "enc.q.lora_A.weight", "enc.q.lora_B.weight"


def _main(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """The CLI in this process (fast): exit code, stdout, stderr. Any exception but the CLI's own fails."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-onnx: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _cmp(ref: np.ndarray, cand: np.ndarray, **kwargs: object):
    return compare(ref, cand, name="y", provider="cpu", rtol=None, atol=None, **kwargs)  # type: ignore[arg-type]


def _linear(path: Path, weight: np.ndarray | None = None) -> Path:
    """y = x @ W (module path enc.q): a LoRA site; ``weight`` may hold NaN / Inf to make outputs so."""
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/enc/q/MatMul")
    w = rng_array((8, 6)) if weight is None else weight
    model = make_model([node], {"x": (F, ["batch", 8])}, ["y"], {"W": w})
    onnx.save(model, path)
    return path


def _nan_weight() -> np.ndarray:
    w = rng_array((8, 6))
    w[:, 0] = np.nan  # column 0 of every output row is NaN, the rest finite
    return w


# ----------------------------------------------------------------------------------------------------
# The comparison rule


def test_candidate_nan_or_inf_where_the_reference_is_finite_always_fails() -> None:
    ref = np.array([1.0, 2.0, 3.0], np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        cand = ref.copy()
        cand[1] = bad
        for allow in (False, True):
            result = _cmp(ref, cand, allow_nonfinite=allow)
            assert not result.ok
            assert "1 NaN/Inf values where the reference is finite" in result.note
            assert (result.nonfinite_reference, result.nonfinite_candidate) == (0, 1)
    # huge tolerances do not turn a NaN into agreement
    cand = np.full(3, np.nan, np.float32)
    assert not compare(ref, cand, name="y", provider="cpu", rtol=1e30, atol=1e30).ok


def test_a_nonfinite_reference_fails_unless_allowed_then_matches_position_by_position() -> None:
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    same = _cmp(ref, ref.copy())
    assert not same.ok
    assert same.note == (
        "reference output 'y' has 3 NaN/Inf values; pass --allow-nonfinite to compare them position by "
        "position"
    )
    assert same.nonfinite_reference == 3
    all_nan = np.full((2, 3), np.nan, np.float32)
    assert not _cmp(all_nan, all_nan.copy()).ok  # 100 % NaN outputs on both sides prove nothing

    assert _cmp(ref, ref.copy(), allow_nonfinite=True).ok
    assert _cmp(all_nan, all_nan.copy(), allow_nonfinite=True).ok
    for cand in (
        np.array([1.0, np.inf, -np.inf, 1.0], np.float32),  # NaN position holds a number
        np.array([np.nan, -np.inf, -np.inf, 1.0], np.float32),  # Inf of the other sign
        np.array([np.nan, np.nan, -np.inf, 1.0], np.float32),  # NaN for Inf
        np.array([np.nan, np.inf, -np.inf, 1.5], np.float32),  # the finite rest out of tolerance
    ):
        assert not _cmp(ref, cand, allow_nonfinite=True).ok, cand
    moved = _cmp(ref, np.array([np.nan, np.inf, 5.0, -np.inf], np.float32), allow_nonfinite=True)
    assert not moved.ok and "where the reference is finite" in moved.note


def test_report_json_carries_the_reason_and_the_counts(tmp_path: Path) -> None:
    model = _linear(tmp_path / "nan.onnx", _nan_weight())
    report = validate(model, model, dims={"batch": 2})
    assert not report.ok
    (output,) = report.to_json()["outputs"]
    assert output["ok"] is False and output["nonfinite_reference"] == 2 == output["nonfinite_candidate"]
    assert "--allow-nonfinite" in output["note"]
    allowed = validate(model, model, dims={"batch": 2}, allow_nonfinite=True)
    assert allowed.ok and allowed.comparisons[0].max_abs == 0.0


@pytest.mark.parametrize(
    ("rtol", "atol", "what"),
    [
        (float("nan"), None, "rtol must be a finite number >= 0, got nan"),
        (-1e-3, None, "rtol must be a finite number >= 0, got -0.001"),
        (float("inf"), None, "rtol must be a finite number >= 0, got inf"),
        (None, {"y": float("nan")}, "atol for output 'y' must be a finite number >= 0"),
        (None, {"*": -1.0}, "atol must be a finite number >= 0"),
    ],
)
def test_nan_negative_or_infinite_tolerances_are_refused(
    rtol: object, atol: object, what: str, tmp_path: Path
) -> None:
    model = _linear(tmp_path / "m.onnx")
    with pytest.raises(LoraOnnxError, match=what):
        validate(model, model, rtol=rtol, atol=atol)  # type: ignore[arg-type]
    assert validate(model, model, rtol=0.0, atol={"y": 0.0}).ok


def test_finite_number_and_nonfinite_count() -> None:
    from lora_onnx.common.finite import finite_number, nonfinite_count

    assert finite_number(0, "--strength") == 0.0 and finite_number("2.5", "x") == 2.5
    for bad in (float("nan"), float("inf"), -1.0, True, "abc", None):
        with pytest.raises(LoraOnnxError, match="must be a finite number >= 0"):
            finite_number(bad, "--strength")
    with pytest.raises(LoraOnnxError, match="> 0"):
        finite_number(0.0, "--alpha", positive=True)
    import ml_dtypes

    assert nonfinite_count(np.array([1, np.nan, np.inf], ml_dtypes.bfloat16)) == 2
    assert nonfinite_count(np.array([1, 2], np.int64)) == 0 == nonfinite_count(np.array(["a"]))


# ----------------------------------------------------------------------------------------------------
# Every proof: inject, inject --peft, merge, slots, mixed, batch


def test_every_proof_refuses_nonfinite_references_unless_allowed(tmp_path: Path) -> None:
    model = _linear(tmp_path / "nan.onnx", _nan_weight())
    dims = {"batch": 2}
    for init in ("default", "random"):  # zero-B proof (unchanged outputs) and the fold proof
        config = LoraConfig(rank=2, init=init)
        result = inject(model, config, validate=True, dims=dims, output=tmp_path / f"{init}.onnx")
        assert result.validation is not None and not result.validation.ok
        assert "--allow-nonfinite" in result.validation.failures[0].note
        assert result.output is None and not (tmp_path / f"{init}.onnx").exists()
        allowed = inject(model, config, validate=True, dims=dims, allow_nonfinite=True)
        assert allowed.validation is not None and allowed.validation.ok

    adapter = write_adapter(tmp_path / "peft", {A_KEY: rng_array((2, 8), 1), B_KEY: rng_array((6, 2), 2)})
    peft = apply_peft(model, adapter, merge=True, validate=True, dims=dims)
    assert peft.validation is not None and not peft.validation.ok
    assert apply_peft(
        model, adapter, merge=True, validate=True, dims=dims, allow_nonfinite=True
    ).validation.ok

    lora = inject(model, LoraConfig(rank=2, init="random"), output=tmp_path / "lora.onnx").output
    assert not merge(lora, validate=True, dims=dims).validation.ok
    assert merge(lora, validate=True, dims=dims, allow_nonfinite=True).validation.ok

    slotted = inject_slots(model, LoraConfig(rank=2), validate=True, dims=dims)
    assert slotted.validation is not None and not slotted.ok
    assert inject_slots(model, LoraConfig(rank=2), validate=True, dims=dims, allow_nonfinite=True).ok

    mixed = inject_mixed(model, [adapter], validate=True, dims={})
    assert mixed.validation is not None and not mixed.ok
    assert inject_mixed(model, [adapter], validate=True, allow_nonfinite=True).ok

    options = BatchOptions(recipe=LoraConfig(rank=2), validate=True, dims=dims)
    report = run_batch([model], tmp_path / "out", options)
    assert [m.status for m in report.models] == ["mismatch"]
    assert "--allow-nonfinite" in report.models[0].mismatches[0]
    allowed_options = BatchOptions(recipe=LoraConfig(rank=2), validate=True, dims=dims, allow_nonfinite=True)
    assert [m.status for m in run_batch([model], tmp_path / "out2", allowed_options).models] == ["ok"]


def test_cli_validate_inject_merge_batch_fail_on_nan_outputs_and_take_allow_nonfinite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _linear(tmp_path / "nan.onnx", _nan_weight())
    report = tmp_path / "r.json"
    code, out, _ = _main(capsys, "validate", model, model, "--dim", "batch=2", "--json", report)
    assert code == 1 and "--allow-nonfinite" in out
    assert json.loads(report.read_text())["outputs"][0]["nonfinite_reference"] == 2

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON (jq and other strict readers refuse it)")

    written = json.loads(report.read_text(), parse_constant=strict)["outputs"][0]
    assert written["max_abs"] in ("inf", "nan") and written["ok"] is False
    assert _main(capsys, "validate", model, model, "--dim", "batch=2", "--allow-nonfinite")[0] == 0
    lora = tmp_path / "lora.onnx"
    inject_args = (
        "inject",
        model,
        "-o",
        lora,
        "--rank",
        "2",
        "--init",
        "random",
        "--validate",
        "--dim",
        "batch=2",
    )
    assert _main(capsys, *inject_args)[0] == 1 and not lora.exists()
    assert _main(capsys, *inject_args, "--allow-nonfinite")[0] == 0 and lora.exists()
    merged = tmp_path / "merged.onnx"
    merge_args = ("merge", lora, "-o", merged, "--validate", "--dim", "batch=2")
    assert _main(capsys, *merge_args)[0] == 1 and not merged.exists()
    assert _main(capsys, *merge_args, "--allow-nonfinite")[0] == 0 and merged.exists()
    batch_args = ("batch", model, "-o", tmp_path / "b", "--validate", "--dim", "batch=2", "--merge")
    assert _main(capsys, *batch_args)[0] == 1
    assert _main(capsys, *batch_args, "--allow-nonfinite")[0] == 0
    folder = write_adapter(tmp_path / "peft", {A_KEY: rng_array((2, 8), 1), B_KEY: rng_array((6, 2), 2)})
    peft_args = ("inject", model, "--peft", folder, "--merge", "--validate", "-o", tmp_path / "p.onnx")
    assert _main(capsys, *peft_args, "--dim", "batch=2")[0] == 1
    assert _main(capsys, *peft_args, "--dim", "batch=2", "--allow-nonfinite")[0] == 0
    slots_args = ("inject", model, "--as-inputs", "--rank", "2", "--validate", "-o", tmp_path / "s.onnx")
    assert _main(capsys, *slots_args, "--dim", "batch=2")[0] == 1
    assert _main(capsys, *slots_args, "--dim", "batch=2", "--allow-nonfinite")[0] == 0
    mixed_args = ("inject", model, "--mixed", "--peft", folder, "--validate", "-o", tmp_path / "x.onnx")
    assert _main(capsys, *mixed_args)[0] == 1
    assert _main(capsys, *mixed_args, "--allow-nonfinite")[0] == 0


@pytest.mark.parametrize(
    ("flag", "fragment"),
    [
        (["--rtol", "nan"], "--rtol must be a finite number >= 0, got nan"),
        (["--atol", "-1"], "--atol must be a finite number >= 0, got -1.0"),
        (["--rtol", "y:inf"], "--rtol for output 'y' must be a finite number >= 0, got inf"),
    ],
)
def test_cli_tolerances_must_be_finite_and_non_negative(
    flag: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _linear(tmp_path / "m.onnx")
    code, _, err = _main(capsys, "validate", model, model, *flag)
    assert code == 2
    _one_line_error(err, fragment)


# ----------------------------------------------------------------------------------------------------
# Adapter tensors: refused at load, naming the key and the file


def _poisoned(value: float, dtype: type = np.float32) -> dict[str, np.ndarray]:
    a = rng_array((2, 8), 1).astype(dtype)
    a[1, 3] = value
    return {A_KEY: a, B_KEY: rng_array((6, 2), 2).astype(dtype)}


def test_peft_tensors_with_nan_or_inf_are_refused_naming_key_and_file(tmp_path: Path) -> None:
    model = _linear(tmp_path / "m.onnx")
    for number, (value, dtype) in enumerate(
        [(np.nan, np.float32), (np.inf, np.float16), (-np.inf, np.float64)]
    ):
        folder = write_adapter(tmp_path / f"a{number}", _poisoned(value, dtype))
        with pytest.raises(AdapterError) as info:
            apply_peft(model, folder, merge=True, validate=True, output=tmp_path / "out.onnx")
        message = str(info.value)
        assert str(folder / "adapter_model.safetensors") in message and repr(A_KEY) in message
        assert "1 NaN/Inf values (first at index (1, 3)" in message
        assert not (tmp_path / "out.onnx").exists()
    # bfloat16 through the lazy reader too
    import ml_dtypes
    from safetensors.numpy import save_file

    path = tmp_path / "bf16.safetensors"
    save_file({A_KEY: np.array([[1.0, np.nan]], ml_dtypes.bfloat16)}, str(path))
    weights = SafetensorsFile(path)
    assert weights.tensors[A_KEY].shape == (1, 2)  # the header still reads lazily
    with pytest.raises(AdapterError, match=r"bf16\.safetensors: tensor 'enc\.q\.lora_A\.weight' has 1 NaN"):
        weights.read(A_KEY)


def test_cli_inject_peft_merge_validate_with_a_nan_tensor_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    model = _linear(tmp_path / "m.onnx")
    folder = write_adapter(tmp_path / "a", _poisoned(np.nan))
    out = tmp_path / "out.onnx"
    result = cli("inject", model, "--peft", folder, "--merge", "--validate", "-o", out)
    assert_one_line_error(result, 2, "adapter_model.safetensors", repr(A_KEY), "NaN/Inf")
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".onnx_adapter", ".safetensors", ".npz"])
def test_adapter_files_with_nan_or_inf_are_refused_at_load(suffix: str, tmp_path: Path) -> None:
    for value in (np.nan, -np.inf):
        tensors = {
            "s.lora_A.weight": np.ones((2, 2), np.float16),
            "s.lora_B.weight": np.ones((2, 2), np.float32),
        }
        tensors["s.lora_B.weight"][0, 1] = value
        path = write_adapter_file(tensors, tmp_path / f"a{suffix}")
        with pytest.raises(AdapterError) as info:
            read_adapter_file(path)
        assert str(path) in str(info.value) and "'s.lora_B.weight' has 1 NaN/Inf values" in str(info.value)
    # integer and empty tensors are not floats to check
    fine = {"n": np.arange(3), "empty.lora_A.weight": np.zeros((2, 0), np.float32)}
    assert sorted(read_adapter_file(write_adapter_file(fine, tmp_path / f"ok{suffix}")).tensors) == sorted(
        fine
    )


def _slots(tmp_path: Path) -> tuple[Path, Path]:
    """A slotted model and a (random, finite) adapter file for it."""
    base = _linear(tmp_path / "base.onnx")
    result = inject_slots(
        base, LoraConfig(rank=2, init="random"), output=tmp_path / "slots.onnx",
        adapter_output=tmp_path / "a.npz",
    )  # fmt: skip
    assert result.output is not None and result.adapter_output is not None
    return result.output, result.adapter_output


def test_slot_and_stack_consumers_refuse_nan_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slots, adapter = _slots(tmp_path)
    tensors = dict(read_adapter_file(adapter).tensors)
    b_name = next(name for name in tensors if name.endswith("lora_B.weight"))
    tensors[b_name] = tensors[b_name].copy()
    tensors[b_name].flat[0] = np.nan
    poisoned = write_adapter_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(AdapterError, match=rf"bad\.safetensors: tensor {b_name!r} has 1 NaN"):
        merge(slots, adapter_file=poisoned, validate=True)
    with pytest.raises(AdapterError, match=rf"bad\.safetensors: tensor {b_name!r}"):
        inject_mixed(slots, [poisoned], validate=True)
    with pytest.raises(AdapterError, match=rf"adapter 0 \(tensors\): tensor {b_name!r} has 1 NaN"):
        inject_mixed(slots, [tensors])  # tensors given in Python, not through a file reader
    code, _, err = _main(capsys, "check-adapter", slots, poisoned)
    assert code == 2
    _one_line_error(err, "bad.safetensors", b_name, "NaN/Inf")


def test_export_adapter_refuses_a_model_whose_branch_holds_nan(tmp_path: Path) -> None:
    lora = inject(_linear(tmp_path / "m.onnx"), LoraConfig(rank=2, init="random"), output=tmp_path / "l.onnx")
    proto = onnx.load(lora.output)
    (b,) = [t for t in proto.graph.initializer if t.name.endswith("lora_B.weight")]
    value = onnx.numpy_helper.to_array(b).copy()
    value.flat[3] = np.inf
    b.CopyFrom(onnx.numpy_helper.from_array(value, b.name))
    onnx.save(proto, tmp_path / "bad.onnx")
    with pytest.raises(AdapterError, match=rf"bad\.onnx: tensor {b.name!r} has 1 NaN/Inf values"):
        export_adapter(tmp_path / "bad.onnx", tmp_path / "a.npz")
    assert not (tmp_path / "a.npz").exists()


# ----------------------------------------------------------------------------------------------------
# Numeric options: --strength, --alpha / alpha_pattern, --rank


def test_merge_strength_must_be_finite_and_non_negative(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slots, adapter = _slots(tmp_path)
    out = tmp_path / "m.onnx"
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(LoraOnnxError, match="--strength must be a finite number >= 0"):
            merge(slots, adapter_file=adapter, strength=bad, validate=True, output=out)
    assert not out.exists()
    assert merge(slots, adapter_file=adapter, strength=0.5, validate=True).validation.ok
    code, _, err = _main(
        capsys, "merge", slots, "--adapter-file", adapter, "--strength", "nan", "--validate", "-o", out
    )
    assert code == 2
    _one_line_error(err, "--strength must be a finite number >= 0, got nan")
    assert not out.exists()


def test_alpha_alpha_pattern_and_rank_must_be_finite_and_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for alpha in (float("nan"), float("inf"), -1.0, 0.0, 1e39):  # 1e39: inf as the graph's float32 scale
        with pytest.raises(LoraOnnxError, match="--alpha must be a positive number"):
            LoraConfig(alpha=alpha)
    with pytest.raises(LoraOnnxError, match=r"alpha_pattern\['q'\] must be at most 3.403e\+38"):
        LoraConfig(alpha_pattern={"q": 1e39})
    for value in (float("inf"), float("nan"), -2.0, 0.0):
        with pytest.raises(LoraOnnxError, match=r"alpha_pattern\['q'\] must be a finite number > 0"):
            LoraConfig(alpha_pattern={"q": value})
    for rank in (0, -3):
        with pytest.raises(LoraOnnxError, match="--rank must be a positive whole number"):
            LoraConfig(rank=rank)
    model = _linear(tmp_path / "m.onnx")
    for flag in (["--alpha-pattern", "q=inf"], ["--alpha", "nan"], ["--rank", "0"]):
        code, _, err = _main(capsys, "inject", model, "-o", tmp_path / "o.onnx", *flag)
        assert code == 2
        _one_line_error(err, "must be a")
    assert not (tmp_path / "o.onnx").exists()
