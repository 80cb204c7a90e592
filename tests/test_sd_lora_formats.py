"""Single-file LoRAs (issue 12): format recognition, kohya names against the graph, components, strengths,
and refusals naming the key and the format. Synthetic files on a tiny inline graph; no torch (the
numerics against diffusers itself are in tests/test_sd_lora_parity.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import save_file

from lora_onnx import apply_peft
from lora_onnx.adapters.formats import (
    components,
    parse_adapter_spec,
    read_lora_file,
    select_component,
)
from lora_onnx.adapters.formats.kohya import resolve_name
from lora_onnx.adapters.peft import plan_peft_adapter
from lora_onnx.errors import AdapterError
from tests.builders import make_model, rel_err, rng_array, run, write_adapter

F = TensorProto.FLOAT
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
CONV = "down_blocks.0.resnets.0.conv1"


def _model() -> onnx.ModelProto:
    """x (3, 8) -> to_q (8 -> 6) -> to_out.0 (6 -> 6); img (1, 4, 5, 5) -> conv1 (3 x 3, 4 -> 4)."""
    scope = "/down_blocks.0/attentions.0/transformer_blocks.0/attn1"
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["h"], name=f"{scope}/to_q/MatMul"),
        helper.make_node("MatMul", ["h", "Wo"], ["y"], name=f"{scope}/to_out.0/MatMul"),
        helper.make_node(
            "Conv", ["img", "Wc"], ["c"], name="/down_blocks.0/resnets.0/conv1/Conv", pads=[1] * 4
        ),
    ]
    inits = {"Wq": rng_array((8, 6), 1), "Wo": rng_array((6, 6), 2), "Wc": rng_array((4, 4, 3, 3), 3)}
    return make_model(nodes, {"x": (F, [3, 8]), "img": (F, [1, 4, 5, 5])}, ["y", "c"], inits)


MODEL = _model()
FEEDS = {"x": rng_array((3, 8), 4), "img": rng_array((1, 4, 5, 5), 5)}


def _kohya(prefix: str = "lora_unet", *, alpha: float | None = 2.0, rank: int = 4) -> dict[str, np.ndarray]:
    out = {}
    for path, (inp, outp) in ((Q, (8, 6)), (OUT, (6, 6))):
        name = f"{prefix}_{path.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = rng_array((rank, inp), 6)
        out[f"{name}.lora_up.weight"] = rng_array((outp, rank), 7)
        if alpha is not None:
            out[f"{name}.alpha"] = np.array(alpha, np.float32)
    name = f"{prefix}_{CONV.replace('.', '_')}"
    out[f"{name}.lora_down.weight"] = rng_array((rank, 4, 3, 3), 8)  # LoCon: k x k down, 1 x 1 up
    out[f"{name}.lora_up.weight"] = rng_array((4, rank, 1, 1), 9)
    if alpha is not None:
        out[f"{name}.alpha"] = np.array(alpha, np.float32)
    return out


def _write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _peft_keys(prefix: str = "unet.") -> dict[str, np.ndarray]:
    """The kohya tensors under PEFT-in-diffusers keys."""
    out = {}
    for key, value in _kohya(alpha=None).items():
        name, _, suffix = key.partition(".")
        path = {p.replace(".", "_"): p for p in (Q, OUT, CONV)}[name.removeprefix("lora_unet_")]
        role = "lora_A" if suffix.startswith("lora_down") else "lora_B"
        out[f"{prefix}{path}.{role}.weight"] = value
    return out


def _reference(tensors: dict[str, np.ndarray], scale: float) -> list[np.ndarray]:
    """The LoRA model computed in numpy: W + scale * B @ A per module (the conv delta: sum over the rank)."""
    wq, wo, wc = (onnx.numpy_helper.to_array(i) for i in MODEL.graph.initializer)
    by = {key.partition(".")[0]: key.partition(".")[0] for key in tensors}
    down = {n: tensors[f"{n}.lora_down.weight"] for n in by}
    up = {n: tensors[f"{n}.lora_up.weight"] for n in by}
    nq, no, nc = (f"lora_unet_{p.replace('.', '_')}" for p in (Q, OUT, CONV))
    wq2 = wq + scale * (up[nq] @ down[nq]).T
    wo2 = wo + scale * (up[no] @ down[no]).T
    wc2 = wc + scale * np.einsum("or,rikl->oikl", up[nc][:, :, 0, 0], down[nc])
    model = _model()
    for init, value in zip(model.graph.initializer, (wq2, wo2, wc2), strict=True):
        init.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), init.name))
    return run(model, FEEDS)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("style.safetensors:0.8", ("style.safetensors", 0.8)),
        ("lcm.safetensors:1", ("lcm.safetensors", 1.0)),
        ("a/b:c/lora.safetensors", ("a/b:c/lora.safetensors", 1.0)),  # ':' inside the path
        ("dir:2.5", ("dir", 2.5)),
        ("x.safetensors:-1", ("x.safetensors:-1", 1.0)),  # not >= 0: part of the path
        ("x.safetensors:nan", ("x.safetensors:nan", 1.0)),
        ("x.safetensors:inf", ("x.safetensors:inf", 1.0)),
        ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
        (":0.5", (":0.5", 1.0)),
        ("x:0", ("x", 0.0)),
    ],
)
def test_adapter_spec_takes_a_strength_only_when_it_is_a_finite_number(spec, expected) -> None:
    assert parse_adapter_spec(spec) == expected


def test_kohya_file_matches_numpy_with_alpha_over_rank(tmp_path) -> None:
    tensors = _kohya(alpha=2.0, rank=4)
    path = _write(tmp_path / "k.safetensors", tensors)
    lora = read_lora_file(path)
    assert lora.format.startswith("kohya") and lora.components == {"unet"}
    result = apply_peft(MODEL, path, output=tmp_path / "out.onnx")
    assert {b.scale for b in result.plan.branches} == {0.5}
    assert {b.site.module_path for b in result.plan.branches} == {Q, OUT, CONV}
    for got, want in zip(run(tmp_path / "out.onnx", FEEDS), _reference(tensors, 0.5), strict=True):
        assert rel_err(got, want) <= 1e-5


def test_kohya_without_alpha_has_scale_one_and_integer_alphas_are_read(tmp_path) -> None:
    plan = plan_peft_adapter(MODEL, _write(tmp_path / "k.safetensors", _kohya(alpha=None, rank=4)))
    assert {b.scale for b in plan.branches} == {1.0}
    tensors = _kohya(alpha=None, rank=4)  # diffusers' convert_state_dict_to_kohya writes int64 alphas
    tensors.update(
        {
            k.replace("lora_down.weight", "alpha"): np.array(8, np.int64)
            for k in list(tensors)
            if k.endswith("lora_down.weight")
        }
    )
    plan = plan_peft_adapter(MODEL, _write(tmp_path / "i.safetensors", tensors))
    assert {b.scale for b in plan.branches} == {2.0}


def test_strength_multiplies_the_scale_and_equals_numpy(tmp_path) -> None:
    tensors = _kohya(alpha=2.0, rank=4)
    path = _write(tmp_path / "k.safetensors", tensors)
    result = apply_peft(MODEL, (path, 0.3), output=tmp_path / "out.onnx")
    assert all(math.isclose(b.scale, 0.15) for b in result.plan.branches)
    for got, want in zip(run(tmp_path / "out.onnx", FEEDS), _reference(tensors, 0.15), strict=True):
        assert rel_err(got, want) <= 1e-5


def test_diffusers_peft_keys_with_metadata_alpha_and_without(tmp_path) -> None:
    tensors = _peft_keys()
    meta = {
        "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 6, "unet.peft_type": "LORA"})
    }
    plan = plan_peft_adapter(MODEL, _write(tmp_path / "m.safetensors", tensors, meta))
    assert {b.scale for b in plan.branches} == {1.5}
    plan = plan_peft_adapter(MODEL, _write(tmp_path / "n.safetensors", tensors))
    assert {b.scale for b in plan.branches} == {1.0}  # diffusers' convention without alphas


def test_old_diffusers_processor_keys_map_to_the_projections(tmp_path) -> None:
    tensors = _peft_keys()
    old = {}
    for key, value in tensors.items():
        direction = "down" if ".lora_A." in key else "up"
        module = key.split(".lora_")[0]
        if module.endswith(".to_q"):
            old[module.removesuffix(".to_q") + f".processor.to_q_lora.{direction}.weight"] = value
        elif module.endswith(".to_out.0"):
            old[module.removesuffix(".to_out.0") + f".processor.to_out_lora.{direction}.weight"] = value
        else:
            old[f"{module}.lora.{direction}.weight"] = value
    new = plan_peft_adapter(MODEL, _write(tmp_path / "new.safetensors", tensors))
    plan = plan_peft_adapter(MODEL, _write(tmp_path / "old.safetensors", old))
    assert [b.site.module_path for b in plan.branches] == [b.site.module_path for b in new.branches]
    for name, value in new.values.items():
        np.testing.assert_array_equal(plan.values[name], value)


def test_components_and_selection_strip_the_prefix(tmp_path) -> None:
    kohya = {**_kohya("lora_unet"), **_kohya("lora_te1"), **_kohya("lora_te2")}
    path = _write(tmp_path / "xl.safetensors", kohya)
    assert components(path) == {"unet", "text_encoder", "text_encoder_2"}
    lora = read_lora_file(path)
    keys = select_component(lora, "text_encoder_2", [Q, OUT, CONV]).peft_keys()
    assert keys[f"{Q}.lora_A.weight"] == f"lora_te2_{Q.replace('.', '_')}.lora_down.weight"
    # before a graph resolves them, kohya paths keep their underscores (dots cannot be told from the name)
    flat_q, flat_conv = Q.replace(".", "_"), CONV.replace(".", "_")
    assert set(lora.peft_keys()) >= {
        f"unet.{flat_q}.lora_A.weight",
        f"text_encoder_2.{flat_conv}.lora_B.weight",
    }
    assert components(write_adapter(tmp_path / "folder", {})) == {""}
    diffusers = _write(tmp_path / "d.safetensors", {**_peft_keys("unet."), **_peft_keys("text_encoder.")})
    assert components(diffusers) == {"unet", "text_encoder"}


def test_several_matching_components_need_component(tmp_path) -> None:
    path = _write(tmp_path / "xl.safetensors", {**_kohya("lora_te1"), **_kohya("lora_te2")})
    with pytest.raises(AdapterError, match=r"'text_encoder', 'text_encoder_2'.*--component NAME"):
        plan_peft_adapter(MODEL, path)
    plan = plan_peft_adapter(MODEL, path, component="text_encoder_2")
    assert len(plan.branches) == 3
    with pytest.raises(AdapterError, match=r"--component 'vae'.*'text_encoder', 'text_encoder_2'"):
        plan_peft_adapter(MODEL, path, component="vae")


def test_component_whose_modules_match_is_chosen(tmp_path) -> None:
    te = {f"text_encoder.encoder.layers.0.self_attn.q_proj.lora_{r}.weight": rng_array(s) for r, s in
          (("A", (4, 8)), ("B", (6, 4)))}  # fmt: skip
    path = _write(tmp_path / "two.safetensors", {**_peft_keys("unet."), **te})
    plan = plan_peft_adapter(MODEL, path)
    assert {b.site.module_path for b in plan.branches} == {Q, OUT, CONV}


def test_a_peft_folders_weights_file_is_read_with_its_config(tmp_path) -> None:
    tensors = {k.removeprefix("unet."): v for k, v in _peft_keys().items()}
    folder = write_adapter(tmp_path / "adapter", tensors, r=4, lora_alpha=2)
    plan = plan_peft_adapter(MODEL, folder / "adapter_model.safetensors")
    assert {b.scale for b in plan.branches} == {0.5}  # the config's alpha / r, not a file's default of 1
    assert {b.scale for b in plan_peft_adapter(MODEL, folder, strength=2.0).branches} == {1.0}


def test_kohya_names_are_resolved_against_the_graph_paths() -> None:
    paths = ["down_blocks.0.attn1.to_out.0", "text_model.encoder.layers.0.mlp.fc1"]
    assert resolve_name("down_blocks_0_attn1_to_out_0", paths, key="k", source="f") == paths[0]
    # the export is rooted below the trained model (text_model.), or above it
    assert resolve_name("encoder_layers_0_mlp_fc1", paths, key="k", source="f") == paths[1]
    assert resolve_name("clip_text_model_encoder_layers_0_mlp_fc1", paths, key="k", source="f") == paths[1]
    assert resolve_name("up_blocks_0_conv", paths, key="k", source="f") is None
    with pytest.raises(AdapterError, match=r"ambiguous.*'a_b_c' spells graph modules a\.b_c, a_b\.c"):
        resolve_name("a_b_c", ["a.b_c", "a_b.c"], key="lora_unet_a_b_c.lora_down.weight", source="f")


def test_kohya_name_with_no_module_names_the_nearest(tmp_path) -> None:
    tensors = _kohya()
    tensors["lora_unet_down_blocks_0_resnets_0_conv9.lora_down.weight"] = rng_array((4, 4, 3, 3))
    tensors["lora_unet_down_blocks_0_resnets_0_conv9.lora_up.weight"] = rng_array((4, 4, 1, 1))
    with pytest.raises(AdapterError, match=r"conv9\.lora_down\.weight' matches no module.*nearest.*conv1"):
        plan_peft_adapter(MODEL, _write(tmp_path / "k.safetensors", tensors))


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.dora_scale", "DoRA (dora_scale"),
        ("lora_unet_x.diff", "full weight difference"),
        ("lora_unet_x.diff_b", "full weight difference"),
        ("lora_unet_x.on_input", "IA3"),
        ("lora_unet_x.lora_mid.weight", "CP / Tucker"),
        ("lora_unet_x.lora_sideways.weight", "suffix 'lora_sideways.weight'"),
        ("unet.x.hada_w1_a", "LoHa"),
        ("unet.x.lora_C.weight", "not a LoRA tensor"),
    ],
)
def test_other_methods_are_refused_naming_key_and_format(tmp_path, key, what) -> None:
    tensors = _kohya() if key.startswith("lora_") else _peft_keys()
    tensors[key] = rng_array((4, 4))
    path = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(AdapterError) as info:
        apply_peft(MODEL, path, output=tmp_path / "out.onnx")
    message = str(info.value)
    assert repr(key) in message and what in message
    assert ("kohya" if key.startswith("lora_") else "diffusers") in message
    assert not (tmp_path / "out.onnx").exists()  # never half-applied


@pytest.mark.slow
def test_cli_refusal_is_one_line_and_several_files_get_their_names(tmp_path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(MODEL, model)
    bad = _kohya()
    bad["lora_unet_x.hada_w1_a"] = rng_array((4, 4))
    _write(tmp_path / "bad.safetensors", bad)
    base = [sys.executable, "-m", "lora_onnx", "inject", str(model), "-o", str(tmp_path / "o.onnx")]
    done = subprocess.run(
        [*base, "--peft", str(tmp_path / "bad.safetensors:0.5")], capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("lora-onnx: error:") == 1 and "LoHa" in done.stderr
    _write(tmp_path / "style.safetensors", _kohya(alpha=2.0))
    _write(tmp_path / "lcm.safetensors", _peft_keys())
    done = subprocess.run(
        [
            *base,
            "--peft",
            f"{tmp_path / 'style.safetensors'}:0.8",
            "--peft",
            str(tmp_path / "lcm.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "as 'style' at strength 0.8" in done.stdout and "as 'lcm'" in done.stdout
    done = subprocess.run(
        [*base, "--peft", f"{tmp_path / 'nope.safetensors'}:x"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "no such adapter folder or LoRA file" in done.stderr


def _batched_model() -> onnx.ModelProto:
    """MODEL with a symbolic batch dim on both inputs (mixed batches need one)."""
    model = _model()
    for graph_input in model.graph.input:
        graph_input.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


@pytest.mark.slow
def test_lora_file_with_strength_as_slots_adapter_file_and_mixed_tenant(tmp_path) -> None:
    import onnxruntime as ort

    tensors = _kohya(alpha=2.0, rank=4)
    lora = _write(tmp_path / "k.safetensors", tensors)
    model = tmp_path / "m.onnx"
    onnx.save(_batched_model(), model)
    base = [sys.executable, "-m", "lora_onnx"]
    slots, adapter = tmp_path / "slots.onnx", tmp_path / "k.onnx_adapter"
    done = subprocess.run(
        [*base, "inject", str(model), "--as-inputs", "--peft", f"{lora}:0.5", "--adapter-out", str(adapter),
         "--validate", "-o", str(slots)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = ort.LoraAdapter()
    loaded.Load(str(adapter))
    options = ort.RunOptions()
    options.add_active_adapter(loaded)
    session = ort.InferenceSession(str(slots), providers=["CPUExecutionProvider"])
    got = session.run(None, FEEDS, options)
    for value, want in zip(got, _reference(tensors, 0.25), strict=True):  # alpha / rank * strength
        assert rel_err(value, want) <= 1e-5

    mixed = tmp_path / "mixed.onnx"
    done = subprocess.run(
        [*base, "inject", str(model), "--mixed", "--peft", f"{lora}:0.5", "--validate", "-o", str(mixed)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    session = ort.InferenceSession(str(mixed), providers=["CPUExecutionProvider"])
    index = next(i.name for i in session.get_inputs() if i.name not in FEEDS)
    x = np.concatenate([FEEDS["x"][:1]] * 2)
    img = np.concatenate([FEEDS["img"]] * 2)
    y, c = session.run(None, {"x": x, "img": img, index: np.array([0, -1], np.int64)})
    want_y, want_c = _reference(tensors, 0.25)
    base_y, base_c = run(_model(), FEEDS)
    assert rel_err(y[0], want_y[0]) <= 1e-5 and rel_err(c[0], want_c[0]) <= 1e-5
    assert rel_err(y[1], base_y[0]) <= 1e-6 and rel_err(c[1], base_c[0]) <= 1e-6


def test_kohya_shape_misfit_names_key_node_and_shapes(tmp_path) -> None:
    tensors = _kohya()
    tensors[f"lora_unet_{Q.replace('.', '_')}.lora_down.weight"] = rng_array((4, 7))  # to_q takes 8 features
    with pytest.raises(
        AdapterError,
        match=r"'lora_unet_\w+_to_q\.lora_down\.weight' has shape \(4, 7\).*lora_A's rows.*needs \(4, 8\)",
    ):
        plan_peft_adapter(MODEL, _write(tmp_path / "k.safetensors", tensors))


def test_peft_ref_carries_strength_and_component_through_apply(tmp_path) -> None:
    from lora_onnx.adapters.formats import PeftRef

    path = _write(
        tmp_path / "xl.safetensors", {**_kohya("lora_te1", alpha=2.0), **_kohya("lora_te2", alpha=1.0)}
    )
    result = apply_peft(MODEL, PeftRef(path, 0.5, "text_encoder_2"), strength=2.0)
    assert {b.scale for b in result.plan.branches} == {0.25}  # 1 / 4 * 0.5 * 2
    assert sorted(b.peft_path for b in result.branches) == sorted([CONV, Q, OUT])
