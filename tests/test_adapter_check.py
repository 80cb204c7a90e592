"""check-adapter: a fitting file passes; missing, unexpected, mis-shaped, mistyped and rank-inconsistent
tensors are each reported, and a file built for another model is rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import MODELS
from swap_builders import mixed_model

from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.adapters.check import check_adapter, check_tensors
from lora_onnx.adapters.files import write_adapter_file
from lora_onnx.commands.swap import fresh_adapter, inject_slots
from lora_onnx.errors import AdapterError


@pytest.fixture(scope="module")
def slotted():
    return inject_slots(mixed_model(), LoraConfig(rank=2), strength_input=True).model


@pytest.fixture(scope="module")
def good(slotted) -> dict[str, np.ndarray]:
    return fresh_adapter(slotted, LoraConfig(rank=4, init="random"))


def _status(check, name: str) -> str:
    return next(row.status for row in check.rows if row.name == name)


def test_a_fitting_file_passes_and_empty_slots_are_fine(slotted, good, tmp_path: Path) -> None:
    path = write_adapter_file(good, tmp_path / "good.onnx_adapter")
    check = check_adapter(slotted, path)
    assert check.ok and check.adapters == ("default",) and check.counts() == {"ok": 10}
    emptied = {
        **good,
        "fc1.lora_A.weight": np.zeros((8, 0), np.float32),
        "fc1.lora_B.weight": np.zeros((0, 16), np.float32),
    }
    check = check_tensors(slotted, emptied)
    assert check.ok and _status(check, "fc1.lora_A.weight") == "empty"
    strength = check_tensors(slotted, {**good, "default.lora_strength": np.array([0.5], np.float32)})
    assert strength.ok and _status(strength, "default.lora_strength") == "ok"


def test_each_kind_of_problem_is_reported(slotted, good) -> None:
    bad = dict(good)
    bad["fc1.lora_A.weight"] = np.ones((9, 4), np.float32)  # in-features 9, the slot takes 8
    bad["fc3.lora_A.weight"] = good["fc3.lora_A.weight"].astype(np.float64)
    bad["fc4.lora_B.weight"] = np.ones((3, 7), np.float32)  # rank 3 but A has rank 4
    del bad["conv.lora_B.weight"]  # half a pair: onnxruntime would fail
    del bad["fc2.lora_A.weight"], bad["fc2.lora_B.weight"]  # a whole slot left out
    bad["fc9.lora_A.weight"] = np.ones((2, 2), np.float32)
    bad["default.lora_strength"] = np.ones((2,), np.float32)
    check = check_tensors(slotted, bad)
    assert not check.ok
    assert _status(check, "fc1.lora_A.weight") == "shape"
    assert _status(check, "fc3.lora_A.weight") == "dtype"
    assert _status(check, "fc4.lora_B.weight") == "rank"
    assert _status(check, "conv.lora_B.weight") == "missing"
    assert _status(check, "fc2.lora_A.weight") == "missing"
    assert _status(check, "fc9.lora_A.weight") == "unexpected"
    assert _status(check, "default.lora_strength") == "shape"
    assert _status(check, "fc1.lora_B.weight") == "ok"
    partial = check_tensors(slotted, bad, partial=True)
    assert (
        _status(partial, "fc2.lora_A.weight") == "unused"
        and _status(partial, "conv.lora_B.weight") == "missing"
    )


def test_a_grouped_conv_needs_a_rank_that_suits_its_groups(slotted, good) -> None:
    odd = {
        **good,
        "conv.lora_A.weight": np.ones((3, 2, 3, 3), np.float32),
        "conv.lora_B.weight": np.ones((6, 1, 1, 1), np.float32),
    }
    check = check_tensors(slotted, odd)
    row = next(r for r in check.rows if r.name == "conv.lora_B.weight")
    assert row.status == "rank" and "A has rank 3 but B has rank 2" in row.detail  # B holds rank / 2


def test_a_file_built_for_another_model_is_rejected(tmp_path: Path) -> None:
    bert = inject_slots(
        MODELS / "tiny_bert" / "model.onnx", LoraConfig(rank=2, targets=TargetSelector(names=("query",)))
    )
    lora_onnx_file = tmp_path / "llama.onnx_adapter"
    llama = inject_slots(
        MODELS / "tiny_llama" / "model.onnx",
        LoraConfig(rank=2, targets=TargetSelector(names=("q_proj",))),
        adapter_output=lora_onnx_file,
    )
    assert llama.adapter_output is not None
    check = check_adapter(bert.model, lora_onnx_file)
    assert not check.ok
    statuses = {row.status for row in check.rows}
    assert statuses == {"missing", "unexpected"}  # bert's query slots are missing, llama's q_proj unknown


def test_a_model_without_slots_is_an_error(tmp_path: Path) -> None:
    path = write_adapter_file({"a": np.ones((1, 1), np.float32)}, tmp_path / "a.npz")
    with pytest.raises(AdapterError, match="has no LoRA slots"):
        check_adapter(MODELS / "tiny_bert" / "model.onnx", path)
