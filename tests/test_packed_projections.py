"""PEFT adapters with separate q / k / v on onnxruntime-genai's packed ``attn.qkv_proj`` (issue 14):
lora_onnx.adapters.peft.packed. The reference is independent of lora-onnx: the builder's own export of
the PEFT-merged transformers model (merge_and_unload), compared logit for logit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rel_err, rng_array, run
from decoder_builders import genai_export, generated_feeds, onnx_logits, peft_adapter, tiny_llama
from onnx import TensorProto, helper

from lora_onnx import apply_peft, export_peft_adapter, inject_slots
from lora_onnx.adapters.peft.packed import parse_module_map
from lora_onnx.errors import AdapterError
from lora_onnx.recipes.config import LoraConfig

F = TensorProto.FLOAT


def _merged_export(model_dir: Path, adapter: Path, folder: Path) -> Path:
    """The builder's export of ``model_dir`` with ``adapter`` merged in by PEFT itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    merged = merged.merge_and_unload()
    target = folder / "merged_hf"
    merged.save_pretrained(target)
    for name in model_dir.iterdir():  # the tokenizer the builder wants
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, target / name.name)
    return genai_export(target, folder / "merged_genai")


@pytest.fixture(scope="module")
def genai(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("packed")
    model_dir = tiny_llama(folder / "hf")
    return model_dir, genai_export(model_dir, folder / "genai")


@pytest.mark.slow
@pytest.mark.parametrize(
    "targets",
    [("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), ("q_proj", "v_proj")],
    ids=["qkv", "qv"],
)
def test_separate_qkv_adapters_apply_to_the_packed_projection(genai, tmp_path: Path, targets) -> None:
    model_dir, base = genai
    adapter = peft_adapter(model_dir, tmp_path / "adapter", targets, seed=5)
    reference = _merged_export(model_dir, adapter, tmp_path)
    feeds = generated_feeds(base)
    want = onnx_logits(reference, feeds)
    assert rel_err(onnx_logits(base, feeds), want) > 1e-3  # the adapter changes the logits

    branches = apply_peft(base, adapter, output=tmp_path / "lora" / "model.onnx", validate=True)
    assert branches.validation is not None and branches.validation.ok
    packed = [b for b in branches.branches if b.module_path.endswith("attn.qkv_proj")]
    assert len(packed) == 1 and packed[0].rank == 4 * sum(
        t in targets for t in ("q_proj", "k_proj", "v_proj")
    )
    assert rel_err(onnx_logits(tmp_path / "lora" / "model.onnx", feeds), want) <= 1e-4

    merged = apply_peft(base, adapter, merge=True, output=tmp_path / "merged" / "model.onnx")
    assert merged.folded
    assert rel_err(onnx_logits(tmp_path / "merged" / "model.onnx", feeds), want) <= 1e-4

    # as slots: the packed branch is an ordinary dense slot, filled from the adapter file
    slots = inject_slots(
        base, LoraConfig(), peft=adapter, output=tmp_path / "slots" / "model.onnx",
        adapter_output=tmp_path / "slots" / "adapter.onnx_adapter",
    )  # fmt: skip
    assert any(b.module_path.endswith("attn.qkv_proj") for b in slots.branches)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "slots" / "model.onnx"), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(tmp_path / "slots" / "adapter.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    (logits,) = [o for o, n in zip(session.run(None, feeds, options), session.get_outputs(), strict=True)
                 if n.name == "logits"]  # fmt: skip
    assert rel_err(logits, want) <= 1e-4

    # PEFT has separate modules: the block branch is not exported as one
    with pytest.raises(AdapterError, match="block branch for the PEFT modules"):
        export_peft_adapter(branches.model, tmp_path / "exported")


def _packed_model() -> onnx.ModelProto:
    """A hand-made ``layers.0.attn.qkv_proj`` MatMul (8 -> 6 + 4 + 4) and an ``o_proj`` after it."""
    qkv, out = "layers.0.attn.qkv_proj.weight", "layers.0.attn.o_proj.weight"
    nodes = [
        helper.make_node("MatMul", ["x", qkv], ["qkv"], name="/layers.0/attn/qkv_proj/MatMul"),
        helper.make_node("MatMul", ["qkv", out], ["y"], name="/layers.0/attn/o_proj/MatMul"),
    ]
    inits = {qkv: rng_array((8, 14), 1), out: rng_array((14, 3), 2)}
    return make_model(nodes, {"x": (F, ["batch", 8])}, ["y"], inits)


def _adapter(
    folder: Path, modules: dict[str, int | tuple[int, int]], rank: int = 2, alpha: float = 4.0
) -> Path:
    """A PEFT folder written directly: module path -> output width (input 8), or (input, output)."""
    import json

    from safetensors.numpy import save_file

    tensors = {}
    for i, (path, width) in enumerate(modules.items()):
        inputs, out = width if isinstance(width, tuple) else (8, width)
        tensors[f"base_model.model.{path}.lora_A.weight"] = rng_array((rank, inputs), 10 + i)
        tensors[f"base_model.model.{path}.lora_B.weight"] = rng_array((out, rank), 20 + i)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "k_proj", "v_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_block_branch_equals_the_members_branches_by_numpy(tmp_path: Path) -> None:
    model = _packed_model()
    members = {"layers.0.self_attn.q_proj": 6, "layers.0.self_attn.k_proj": 4, "layers.0.self_attn.v_proj": 4}
    folder = _adapter(tmp_path / "a", members)
    result = apply_peft(model, folder)
    (branch,) = result.branches
    assert branch.module_path == "layers.0.attn.qkv_proj" and branch.rank == 6 and branch.scale == 1.0
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    delta = np.concatenate(
        [
            2.0
            * (
                tensors[f"base_model.model.{p}.lora_B.weight"]
                @ tensors[f"base_model.model.{p}.lora_A.weight"]
            ).T
            for p in members
        ],
        axis=1,
    )  # fmt: skip  (scale alpha / r = 2; q, k, v side by side)
    x = rng_array((3, 8), 7)
    want = (x @ (weights["layers.0.attn.qkv_proj.weight"] + delta)) @ weights["layers.0.attn.o_proj.weight"]
    assert rel_err(run(result.model.proto, {"x": x})[0], want) <= 1e-5


def test_a_member_left_out_takes_what_the_width_leaves_else_it_is_refused(tmp_path: Path) -> None:
    model = _packed_model()
    # k left out: its slice is 14 - 6 - 4
    kept = _adapter(tmp_path / "qv", {"layers.0.self_attn.q_proj": 6, "layers.0.self_attn.v_proj": 4})
    (branch,) = apply_peft(model, kept).branches
    assert branch.rank == 4
    # k and v left out, q adapted: q's slice is first, so it places
    assert apply_peft(model, _adapter(tmp_path / "q", {"layers.0.self_attn.q_proj": 6})).branches
    # q and k left out: v's offset cannot be known
    only_v = _adapter(tmp_path / "v", {"layers.0.self_attn.v_proj": 4})
    with pytest.raises(AdapterError, match="cannot be placed; adapt all but one of q_proj, k_proj, v_proj"):
        apply_peft(model, only_v)
    widths = {"layers.0.self_attn.q_proj": 8, "layers.0.self_attn.k_proj": 4, "layers.0.self_attn.v_proj": 4}
    wide = _adapter(tmp_path / "wide", widths)
    with pytest.raises(AdapterError, match="16 outputs together, but it has 14"):
        apply_peft(model, wide)


def test_module_map_renames_before_matching(tmp_path: Path) -> None:
    model = _packed_model()
    folder = _adapter(tmp_path / "a", {"decoder.h.0.attn.c_proj": (14, 3)})  # renamed to layers.0.attn.o_proj
    with pytest.raises(AdapterError, match="matches no module"):
        apply_peft(model, folder)
    result = apply_peft(model, folder, module_map=[r"^decoder\.h\.=layers.", r"c_proj$=o_proj"])
    assert [b.module_path for b in result.branches] == ["layers.0.attn.o_proj"]
    with pytest.raises(AdapterError, match="takes REGEX=REPL"):
        parse_module_map(["no-equals"])
    with pytest.raises(AdapterError, match="is no regular expression"):
        parse_module_map(["(=x"])


@pytest.mark.slow
def test_int4_matmulnbits_sites_take_peft_keys_and_fold_dequantized(genai, tmp_path: Path) -> None:
    """The builder's int4 export (MatMulNBits): PEFT's q / k / v (packed) and o_proj apply as float
    branches; ``merge --dequantize`` folds them, proven within the int4 kernels' measured rounding."""
    import subprocess
    import sys

    import lora_onnx

    model_dir, _ = genai
    int4 = tmp_path / "int4"
    done = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(int4),
         "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    adapter = peft_adapter(model_dir, tmp_path / "adapter", ("q_proj", "k_proj", "v_proj", "o_proj"), seed=3)
    applied = apply_peft(int4 / "model.onnx", adapter, output=tmp_path / "lora" / "model.onnx")
    assert {(b.op, b.module_path, b.rank) for b in applied.branches} == {
        ("MatMulNBits", "model.layers.0.attn.qkv_proj", 12), ("MatMulNBits", "model.layers.0.attn.o_proj", 4),
    }  # fmt: skip
    feeds = generated_feeds(int4 / "model.onnx")
    assert (
        rel_err(onnx_logits(tmp_path / "lora" / "model.onnx", feeds), onnx_logits(int4 / "model.onnx", feeds))
        > 1e-3
    )
    merged = lora_onnx.merge(
        tmp_path / "lora" / "model.onnx",
        dequantize=True,
        validate=True,
        output=tmp_path / "merged" / "model.onnx",
    )
    assert merged.validation is not None and merged.validation.ok


def test_an_inferred_width_must_match_its_equal_partner(tmp_path: Path) -> None:
    """k and v are equally wide in a qkv pack: a q too wide for the base shows in the k it leaves."""
    model = _packed_model()  # 14 = q 6 + k 4 + v 4
    wrong_q = _adapter(tmp_path / "a", {"layers.0.self_attn.q_proj": 8, "layers.0.self_attn.v_proj": 4})
    with pytest.raises(AdapterError, match="k_proj would be 2 wide but v_proj 4"):
        apply_peft(model, wrong_q)
