"""Adapters for slots from other sources (a constant-branch model), and folding a chosen adapter file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import MODELS, rel_err, run
from swap_builders import load_adapter, mixed_feeds, mixed_model, run_with, session

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.adapters.files import read_adapter_file, write_adapter_file
from lora_onnx.commands.swap import export_adapter, fresh_adapter, inject_slots
from lora_onnx.errors import AdapterError, FoldError, LoraOnnxError


def test_export_from_a_constant_model_scales_b_and_runs_in_the_slots(tmp_path: Path) -> None:
    base = mixed_model()
    config = LoraConfig(rank=2, alpha=6, init="random", seed=4)
    constant = lora_onnx.save_model(lora_onnx.inject(base, config).model, tmp_path / "c.onnx")
    inject_slots(base, LoraConfig(rank=8), output=tmp_path / "slots.onnx")  # the slots' rank is free
    result = export_adapter(constant, tmp_path / "c.safetensors")
    assert result.format == "safetensors" and result.adapter == "default" and not result.empty
    tensors = read_adapter_file(result.output).tensors
    injected = lora_onnx.load_model(constant)
    # scale 6 / 2 = 3 is folded into B; A is stored as is
    assert np.allclose(tensors["fc1.lora_B.weight"], 3 * injected.array("fc1.lora_B.weight"))
    assert np.array_equal(tensors["fc1.lora_A.weight"], injected.array("fc1.lora_A.weight"))
    for_slots = export_adapter(constant, tmp_path / "c.onnx_adapter", for_model=tmp_path / "slots.onnx")
    assert sorted(for_slots.tensors) == sorted(tensors)
    feeds = mixed_feeds()
    got = run_with(session(tmp_path / "slots.onnx"), feeds, load_adapter(for_slots.output))
    for a, b in zip(got, run(constant, feeds), strict=True):
        assert rel_err(a, b) <= 1e-4


def test_export_for_slots_fills_slots_the_adapter_lacks_with_empty_tensors(tmp_path: Path) -> None:
    base = mixed_model()
    partial = LoraConfig(rank=2, init="random", targets=TargetSelector(names=("fc1",)))
    constant = lora_onnx.inject(base, partial).model
    slots = inject_slots(base, LoraConfig(rank=2)).model
    result = export_adapter(constant, tmp_path / "a.npz", for_model=slots)
    assert len(result.tensors) == 10 and len(result.empty) == 4
    assert result.tensors["fc3.lora_A.weight"] == (12, 0)
    assert lora_onnx.check_adapter(slots, result.output).ok


def test_export_refusals_are_one_line_user_errors(tmp_path: Path) -> None:
    base = mixed_model()
    slots = inject_slots(base, LoraConfig(rank=2)).model
    with pytest.raises(AdapterError, match="carries only empty LoRA slots"):
        export_adapter(slots, tmp_path / "a.onnx_adapter")
    with pytest.raises(AdapterError, match="carries no lora-onnx branches"):
        export_adapter(base, tmp_path / "a.onnx_adapter")
    with pytest.raises(LoraOnnxError, match="--peft DIR needs --for MODEL"):
        export_adapter(peft=tmp_path, output=tmp_path / "a.onnx_adapter")
    grouped_a = lora_onnx.inject(
        base, LoraConfig(rank=2, init="random", targets=TargetSelector(names=("conv",)))
    )
    other = inject_slots(base, LoraConfig(rank=2, targets=TargetSelector(names=("fc1",)))).model
    with pytest.raises(AdapterError, match="has no slot there"):
        export_adapter(grouped_a.model, tmp_path / "a.onnx_adapter", for_model=other)
    assert not list(tmp_path.iterdir())


def test_peft_paths_name_a_missing_adapter_folder(tmp_path: Path) -> None:
    slots = inject_slots(mixed_model(), LoraConfig(rank=2)).model
    missing = tmp_path / "nothing"
    with pytest.raises(LoraOnnxError, match=re.escape(str(missing))):
        export_adapter(peft=missing, for_model=slots, output=tmp_path / "a.onnx_adapter")
    with pytest.raises(LoraOnnxError, match=re.escape(str(missing))):
        inject_slots(mixed_model(), peft=missing)
    assert not list(tmp_path.iterdir())


def test_fold_with_a_chosen_adapter_equals_running_it_active(tmp_path: Path) -> None:
    base = mixed_model()
    feeds = mixed_feeds()
    two = inject_slots(base, LoraConfig(rank=2), strength_input=True).model
    two = inject_slots(
        two, LoraConfig(rank=2, adapter_name="other", targets=TargetSelector(names=("fc3",)))
    ).model
    slotted = lora_onnx.save_model(two, tmp_path / "slots.onnx")
    adapter = tmp_path / "a.onnx_adapter"
    fresh_adapter(slotted, LoraConfig(rank=4, alpha=2, init="random", seed=9), output=adapter)
    sess = session(slotted)
    active = run_with(sess, feeds, load_adapter(adapter))
    half = run_with(
        sess, {**feeds, "default.lora_strength": np.array([0.5], np.float32)}, load_adapter(adapter)
    )
    for strength, expected in ((None, active), (0.5, half)):
        name = f"merged_{strength}.onnx"
        merged = lora_onnx.merge(slotted, output=tmp_path / name, adapter_file=adapter, strength=strength)
        assert len(merged.folded) == 5 and len(merged.slots_removed) == 1  # the other adapter's slot
        proto = onnx.load(tmp_path / name)
        # a plain model: the base's nodes and inputs, no slot left
        assert [n.name for n in proto.graph.node] == [n.name for n in base.graph.node]
        assert [i.name for i in proto.graph.input] == [i.name for i in base.graph.input]
        got = run(proto, feeds)
        assert rel_err(got[0], expected[0]) <= 1e-3  # W3 is float16: its fold rounds to fp16
        for a, b in zip(got[1:], expected[1:], strict=True):
            assert rel_err(a, b) <= 1e-4
    assert rel_err(half[1], active[1]) > 1e-3


def test_fold_refuses_slots_without_a_file_and_files_that_do_not_fit(tmp_path: Path) -> None:
    slotted = inject_slots(mixed_model(), LoraConfig(rank=2)).model
    with pytest.raises(FoldError, match=r"merge --adapter-file FILE"):
        lora_onnx.merge(slotted)
    wrong = write_adapter_file({"fc1.lora_A.weight": np.ones((7, 2), np.float32)}, tmp_path / "w.npz")
    with pytest.raises(AdapterError, match=r"w\.npz does not fit .*'fc1.lora_A.weight' is mis-shaped"):
        lora_onnx.merge(slotted, adapter_file=wrong)
    with pytest.raises(LoraOnnxError, match="pass --adapter-file FILE"):
        lora_onnx.merge(slotted, strength=0.5)


def test_external_data_model_slots_and_fold(tmp_path: Path) -> None:
    llama = MODELS / "tiny_llama" / "model.onnx"
    config = LoraConfig(rank=2, init="random", seed=1, targets=TargetSelector(names=("q_proj", "down_proj")))
    inject_slots(llama, config, output=tmp_path / "slots.onnx", adapter_output=tmp_path / "a.onnx_adapter")
    merged = lora_onnx.merge(
        tmp_path / "slots.onnx", output=tmp_path / "m.onnx", adapter_file=tmp_path / "a.onnx_adapter"
    )
    constant = lora_onnx.save_model(lora_onnx.inject(llama, config).model, tmp_path / "c.onnx")
    feeds = {
        "input_ids": np.arange(12, dtype=np.int64).reshape(2, 6),
        "attention_mask": np.ones((2, 6), np.int64),
    }
    assert merged.output is not None
    assert rel_err(run(merged.output, feeds)[0], run(constant, feeds)[0]) <= 1e-4


def test_export_for_a_model_with_several_slot_adapters_takes_name(tmp_path: Path) -> None:
    base = mixed_model()
    constant = lora_onnx.inject(base, LoraConfig(rank=2, init="random")).model
    slots = inject_slots(base, LoraConfig(rank=2, adapter_name="a")).model
    slots = inject_slots(
        slots, LoraConfig(rank=2, adapter_name="b", targets=TargetSelector(names=("fc1",)))
    ).model
    with pytest.raises(AdapterError, match="choose one with --name"):
        export_adapter(constant, tmp_path / "x.npz", for_model=slots)
    with pytest.raises(AdapterError, match="has no slot there for adapter 'b'"):
        export_adapter(constant, tmp_path / "x.npz", for_model=slots, adapter="b")
    result = export_adapter(constant, tmp_path / "x.npz", for_model=slots, adapter="a")
    assert result.adapter == "a" and len(result.tensors) == 10
    assert all(".a.lora_" in name for name in result.tensors)
