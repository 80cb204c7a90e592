"""Adapters that cannot be applied: one-line errors naming the file, key, module or node and what to do,
exit code 2 from the CLI, and nothing written. Synthetic adapters; no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lora_onnx.adapters.peft import plan_peft_adapter
from lora_onnx.adapters.peft.tensors import SafetensorsFile, encode_safetensors
from lora_onnx.errors import AdapterError
from tests.builders import make_model, rng_array, write_adapter

F = TensorProto.FLOAT


def _model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="/enc/q/MatMul"),
        helper.make_node("Gemm", ["h", "Wg"], ["g"], name="/enc/g/Gemm", transB=1, alpha=0.5),
        helper.make_node("Conv", ["img", "Wc"], ["c"], name="/enc/conv/Conv", group=2, pads=[1, 1, 1, 1]),
    ]
    inits = {"W": rng_array((8, 6)), "Wg": rng_array((4, 6)), "Wc": rng_array((4, 2, 3, 3))}
    return make_model(nodes, {"x": (F, [3, 8]), "img": (F, [1, 4, 5, 5])}, ["g", "c"], inits)


MODEL = _model()
GOOD = {"enc.q.lora_A.weight": rng_array((2, 8)), "enc.q.lora_B.weight": rng_array((6, 2))}


def _error(folder: Path) -> str:
    with pytest.raises(AdapterError) as info:
        plan_peft_adapter(MODEL, folder)
    return str(info.value)


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ({"peft_type": "LOHA"}, ("LoHa adapters (peft_type LOHA) are not LoRA", "peft.save_as_lora")),
        ({"peft_type": "LOKR"}, ("LoKr", "merge_and_unload")),
        ({"init_lora_weights": "pissa_niter_4"}, ("PiSSA", "path_initial_model_for_weight_conversion")),
        ({"init_lora_weights": "olora"}, ("OLoRA", "path_initial_model_for_weight_conversion")),
        ({"init_lora_weights": "corda"}, ("CorDA", "path_initial_model_for_weight_conversion")),
        ({"init_lora_weights": "loftq"}, ("LoftQ-quantized base weights", "merge_and_unload")),
        ({"use_qalora": True}, ("use_qalora is set", "pools the input")),
        ({"alora_invocation_tokens": [1, 2]}, ("aLoRA", "invocation tokens")),
        ({"trainable_token_indices": [3]}, ("trainable_token_indices", "trainable tokens"),),
        ({"layer_replication": [[0, 1]]}, ("layer_replication",),),
        ({"bias": "all"}, ("bias='all' trains the base model's own biases",)),
        ({"use_dora": True, "lora_bias": True}, ("PEFT itself rejects",)),
        ({"r": 0}, ("r must be a positive whole number",)),
        ({"rank_pattern": {"(": 2}}, ("rank_pattern key '(' is not a valid regular expression",)),
    ],
)  # fmt: skip
def test_unsupported_configs_are_named_with_what_to_do(
    config: dict, fragments: tuple[str, ...], tmp_path: Path
) -> None:
    message = _error(write_adapter(tmp_path / "a", GOOD, **config))
    assert "adapter_config.json" in message
    for fragment in fragments:
        assert fragment in message


def test_supported_inits_and_inference_neutral_variants_apply(tmp_path: Path) -> None:
    for number, config in enumerate(
        [{"init_lora_weights": "eva"}, {"init_lora_weights": "orthogonal"}, {"init_lora_weights": "gaussian"},
         {"init_lora_weights": "mica"}, {"velora_config": {"rank": 2}}]
    ):  # fmt: skip
        assert plan_peft_adapter(MODEL, write_adapter(tmp_path / str(number), GOOD, **config)).branches


def test_missing_files_say_what_is_missing(tmp_path: Path) -> None:
    assert "no such adapter folder" in _error(tmp_path / "nowhere")
    folder = write_adapter(tmp_path / "a", GOOD)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    message = _error(folder)
    assert "only in adapter_model.bin" in message and "save_pretrained() it again" in message
    nested = tmp_path / "multi"
    write_adapter(nested / "french", GOOD)
    write_adapter(nested / "german", GOOD)
    assert "its subfolders french, german hold adapters: pass one" in _error(nested)
    (folder / "adapter_config.json").write_text("{not json")
    assert "not a readable JSON adapter config" in _error(folder)


def test_non_lora_keys_are_refused_by_name(tmp_path: Path) -> None:
    tensors = {**GOOD, "base_model.model.classifier.weight": rng_array((3, 6))}
    message = _error(write_adapter(tmp_path / "a", tensors, modules_to_save=["classifier"]))
    assert "'base_model.model.classifier.weight' is a modules_to_save copy of module 'classifier'" in message
    tensors = {**GOOD, "base_model.model.enc.q.weight": rng_array((6, 8))}
    assert "plain parameter of the base model" in _error(write_adapter(tmp_path / "b", tensors))


@pytest.mark.parametrize(
    ("tensors", "config", "fragment"),
    [
        (
            {"enc.q.lora_A.weight": rng_array((2, 7)), "enc.q.lora_B.weight": rng_array((6, 2))},
            {},
            "key 'enc.q.lora_A.weight' has shape (2, 7), but rank 2 (adapter_config.json r / rank_pattern "
            "for 'enc.q') needs (2, 8) for MatMul node '/enc/q/MatMul' (enc.q, weight 'W' (8, 6))",
        ),
        (GOOD, {"r": 4}, "key 'enc.q.lora_A.weight' has shape (2, 8), but rank 4"),
        (GOOD, {"rank_pattern": {"q": 3}}, "has shape (2, 8), but rank 3"),
        (GOOD, {"use_dora": True}, "sets use_dora, but module 'enc.q' has no lora_magnitude_vector key"),
        (
            {**GOOD, "enc.q.lora_magnitude_vector": np.ones((5,), np.float32)},
            {"use_dora": True},
            "key 'enc.q.lora_magnitude_vector' has shape (5,), but its DoRA magnitude needs (6,)",
        ),
        ({**GOOD, "enc.q.lora_B.bias": rng_array((6,))}, {}, "does not set lora_bias"),
        (GOOD, {"lora_bias": True}, "sets lora_bias, but module 'enc.q' has no lora_B.bias key"),
        (
            {"enc.g.lora_A.weight": rng_array((2, 6)), "enc.g.lora_B.weight": rng_array((4, 2))},
            {},
            "Gemm node '/enc/g/Gemm' with alpha=0.5",
        ),
        (
            {
                "enc.conv.lora_A.weight": rng_array((3, 4, 3, 3)),
                "enc.conv.lora_B.weight": rng_array((4, 1, 1, 1)),
            },
            {"r": 3},
            "rank 3 is not a multiple of the groups (2) of conv node '/enc/conv/Conv'",
        ),
        ({"enc.q.lora_A.weight": rng_array((2, 8))}, {}, "module 'enc.q' has no lora_B key"),
    ],
)
def test_tensors_that_do_not_fit_name_key_and_shapes(
    tensors: dict, config: dict, fragment: str, tmp_path: Path
) -> None:
    assert fragment in _error(write_adapter(tmp_path / "a", tensors, **config))


def test_unreadable_safetensors_files_are_refused(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a", GOOD)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])
    assert "not a safetensors file, or truncated" in _error(folder)
    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    assert "not a safetensors file" in _error(folder)
    weights.write_bytes(encode_safetensors({"enc.q.lora_A.weight": np.zeros((2, 8), np.float32)})[:10])
    assert "not a safetensors file" in _error(folder)


def test_non_float_adapter_tensors_are_named(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a", {**GOOD, "enc.q.lora_B.weight": np.ones((6, 2), np.int32)})
    message = _error(folder)
    assert "'enc.q.lora_B.weight' has dtype I32" in message and "F32, F16, BF16 or F64" in message


def test_safetensors_round_trip_with_metadata_and_bfloat16(tmp_path: Path) -> None:
    import ml_dtypes
    from safetensors.numpy import load_file

    tensors = {
        "a": rng_array((3, 4)),
        "b": rng_array((5,)).astype(np.float16),
        "c": np.zeros((0, 2), np.float32),
    }
    path = tmp_path / "t.safetensors"
    path.write_bytes(encode_safetensors(tensors, {"format": "pt"}))
    reference = load_file(str(path))
    opened = SafetensorsFile(path)
    assert opened.metadata == {"format": "pt"}
    for key, value in tensors.items():
        np.testing.assert_array_equal(reference[key], value)
        np.testing.assert_array_equal(opened.read(key), value)
        assert opened.read(key).dtype == value.dtype
    bf16 = rng_array((2, 3)).astype(ml_dtypes.bfloat16)
    path.write_bytes(encode_safetensors({"w": bf16}))
    assert SafetensorsFile(path).tensors["w"].dtype == "BF16"
    np.testing.assert_array_equal(SafetensorsFile(path).read("w"), bf16)


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_onnx", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_errors_exit_2_on_one_line_and_write_nothing(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    onnx.save(MODEL, model)
    bad = write_adapter(
        tmp_path / "bad", {"enc.k.lora_A.weight": rng_array((2, 8)), "enc.k.lora_B.weight": rng_array((6, 2))}
    )
    good = write_adapter(tmp_path / "good", GOOD)
    out = tmp_path / "out" / "lora.onnx"
    runs = [
        (("inject", model, "--peft", bad, "-o", out), "key 'enc.k.lora_A.weight' matches no module"),
        (("inject", model, "--peft", good, "-o", out, "--rank", "4"), "drop --rank"),
        (("inject", model, "--merge", "-o", out), "--merge applies with --peft"),
        (("inject", model, "--peft", tmp_path / "missing", "-o", out), "no such adapter folder"),
    ]
    for args, fragment in runs:
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("lora-onnx: error:")]
        assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.stderr
        assert not out.parent.exists()
    ok = cli("inject", model, "--peft", good, "-o", out, "--merge", "--validate")
    assert ok.returncode == 0, ok.stderr
    assert "Applied PEFT adapter" in ok.stdout and "Merged: folded 1 branch(es)" in ok.stdout
    assert out.exists()
