"""PEFT keys -> sites: module-path matching rules, numerics of the applied branches, and mapping errors.

Tiny inline models and synthetic adapters (safetensors written by the safetensors library); no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lora_onnx
from lora_onnx import find_sites
from lora_onnx.adapters.peft import plan_peft_adapter
from lora_onnx.adapters.peft.mapping import parse_keys
from lora_onnx.errors import AdapterError
from tests.builders import make_model, rel_err, rng_array, run, write_adapter

F = TensorProto.FLOAT
IN, OUT = 8, 6
X = rng_array((3, IN), 100)


def _node_name(path: str, suffix: str = "MatMul") -> str:
    return "/" + path.replace(".", "/") + "/" + suffix  # TorchScript scope names


def _linears(*paths: str) -> onnx.ModelProto:
    """One MatMul per module path, all reading x, each its own graph output."""
    nodes = [
        helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=_node_name(p)) for i, p in enumerate(paths)
    ]
    inits = {f"W{i}": rng_array((IN, OUT), i) for i in range(len(paths))}
    return make_model(nodes, {"x": (F, [3, IN])}, [f"y{i}" for i in range(len(paths))], inits)


def _lora(
    path: str, rank: int = 2, seed: int = 0, prefix: str = "base_model.model."
) -> dict[str, np.ndarray]:
    return {
        f"{prefix}{path}.lora_A.weight": rng_array((rank, IN), 50 + seed),
        f"{prefix}{path}.lora_B.weight": rng_array((OUT, rank), 60 + seed),
    }


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _expected(
    model: onnx.ModelProto, w: str, tensors: dict[str, np.ndarray], path: str, scale: float
) -> np.ndarray:
    a = next(v for k, v in tensors.items() if k.endswith(f"{path}.lora_A.weight"))
    b = next(v for k, v in tensors.items() if k.endswith(f"{path}.lora_B.weight"))
    x = X.astype(np.float64)
    return x @ _weight(model, w) + scale * (x @ a.T) @ b.T


@pytest.mark.parametrize(
    ("graph_path", "adapter_path"),
    [
        ("model.layers.0.q", "model.layers.0.q"),  # exact
        ("model.layers.0.q", "layers.0.q"),  # the export wraps the model PEFT wrapped (graph path longer)
        ("layers.0.q", "model.layers.0.q"),  # PEFT wrapped a task model, the export is the inner one
    ],
)
def test_keys_match_by_path_or_dotted_suffix_either_way(
    graph_path: str, adapter_path: str, tmp_path: Path
) -> None:
    model = _linears(graph_path, graph_path.replace(".0.", ".1."))
    tensors = _lora(adapter_path)
    folder = write_adapter(tmp_path / "adapter", tensors, r=2, lora_alpha=6)
    result = lora_onnx.apply_peft(model, folder)
    (branch,) = result.branches
    assert (branch.module_path, branch.peft_path, branch.scale) == (graph_path, adapter_path, 3.0)
    y0, y1 = run(result.model.proto, {"x": X})
    assert rel_err(y0, _expected(model, "W0", tensors, adapter_path, 3.0)) <= 1e-5
    assert rel_err(y1, X @ _weight(model, "W1")) <= 1e-6  # the other layer is untouched


def test_keys_without_prefix_and_with_an_adapter_name_infix(tmp_path: Path) -> None:
    model = _linears("enc.q", "enc.v")
    tensors = {**_lora("enc.q", prefix=""), "enc.v.lora_A.default.weight": rng_array((2, IN), 7)}
    tensors["enc.v.lora_B.default.weight"] = rng_array((OUT, 2), 8)
    result = lora_onnx.apply_peft(model, write_adapter(tmp_path / "a", tensors))
    assert sorted(b.peft_path for b in result.branches) == ["enc.q", "enc.v"]


def test_rank_and_alpha_patterns_use_the_adapter_paths(tmp_path: Path) -> None:
    # the patterns name "^layers..." (the adapter's own root); the graph paths carry an extra "model."
    model = _linears("model.layers.0.q", "model.layers.1.q")
    tensors = {**_lora("layers.0.q", rank=2), **_lora("layers.1.q", rank=4, seed=1)}
    folder = write_adapter(
        tmp_path / "a", tensors, r=2, lora_alpha=4, rank_pattern={r"^layers\.1\.q": 4},
        alpha_pattern={"layers.1.q": 2}, use_rslora=True,
    )  # fmt: skip
    branches = {b.peft_path: b for b in lora_onnx.apply_peft(model, folder).branches}
    assert (branches["layers.0.q"].rank, branches["layers.0.q"].scale) == (2, pytest.approx(4 / 2**0.5))
    assert (branches["layers.1.q"].rank, branches["layers.1.q"].scale) == (4, pytest.approx(1.0))


def test_a_module_run_twice_gets_its_branch_on_every_node_and_folds_once(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="/model/shared/MatMul"),
        helper.make_node("Relu", ["h"], ["r"], name="/model/act/Relu"),
        helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["rs"], name="/model/slice/Slice"),
        helper.make_node("MatMul", ["rs", "W"], ["y"], name="/model/shared/MatMul_1"),
    ]
    inits = {
        "W": rng_array((IN, IN), 1), "starts": np.array([0], np.int64), "ends": np.array([IN], np.int64),
        "axes": np.array([1], np.int64),
    }  # fmt: skip
    model = make_model(nodes, {"x": (F, [3, IN])}, ["y"], inits)
    a, b = rng_array((2, IN), 2), rng_array((IN, 2), 3)
    folder = write_adapter(tmp_path / "a", {"model.shared.lora_A.weight": a, "model.shared.lora_B.weight": b})
    result = lora_onnx.apply_peft(model, folder)
    assert [br.site for br in result.branches] == ["/model/shared/MatMul", "/model/shared/MatMul_1"]
    assert len({(br.a, br.b) for br in result.branches}) == 1  # one pair of tensors, as in PEFT
    w = _weight(model, "W").astype(np.float64) + 2.0 * (a.T @ b.T)
    expected = np.maximum(X @ w, 0) @ w
    (y,) = run(result.model.proto, {"x": X})
    assert rel_err(y, expected) <= 1e-5
    merged = lora_onnx.merge(result.model).model
    assert rel_err(np.asarray(merged.array("W")), w) <= 1e-6  # the shared delta is added once


def test_ambiguous_suffix_names_the_candidates(tmp_path: Path) -> None:
    model = _linears("model.layers.0.q", "model.layers.1.q")
    folder = write_adapter(tmp_path / "a", _lora("q"))
    with pytest.raises(AdapterError, match=r"ambiguous.*model\.layers\.0\.q, model\.layers\.1\.q"):
        plan_peft_adapter(model, folder)


def test_unmatched_key_lists_the_nearest_module_paths(tmp_path: Path) -> None:
    model = _linears("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")
    folder = write_adapter(tmp_path / "a", _lora("model.layers.0.self_attn.k_proj"))
    with pytest.raises(AdapterError) as info:
        plan_peft_adapter(model, folder)
    message = str(info.value)
    assert "'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight' matches no module" in message
    assert "nearest module paths: model.layers.0.self_attn.q_proj" in message


def test_a_module_that_cannot_take_a_branch_is_reported_with_its_node_and_reason(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["y"], name="/model/proj/MatMul")]
    model = make_model(nodes, {"x": (F, [3, IN]), "w_in": (F, [IN, OUT])}, ["y"], {})
    folder = write_adapter(tmp_path / "a", _lora("model.proj"))
    with pytest.raises(
        AdapterError, match=r"MatMul node '/model/proj/MatMul'.*cannot take a branch.*graph input"
    ):
        plan_peft_adapter(model, folder)


def test_two_adapter_modules_on_one_graph_module_are_refused(tmp_path: Path) -> None:
    model = _linears("fc")
    tensors = {**_lora("encoder.fc"), **_lora("decoder.fc", seed=1)}
    with pytest.raises(AdapterError, match=r"'decoder\.fc' and 'encoder\.fc' both match graph module 'fc'"):
        plan_peft_adapter(model, write_adapter(tmp_path / "a", tensors))  # keys are read in sorted order


def test_an_embedding_adapter_on_a_linear_names_the_export(tmp_path: Path) -> None:
    model = _linears("model.embed")
    tensors = {
        "model.embed.lora_embedding_A": rng_array((2, 10)),
        "model.embed.lora_embedding_B": rng_array((6, 2)),
    }
    with pytest.raises(AdapterError, match=r"adapts an embedding.*exported as MatMul"):
        plan_peft_adapter(model, write_adapter(tmp_path / "a", tensors))


def test_parse_keys_groups_roles_and_rejects_strangers() -> None:
    (module,) = parse_keys(
        [
            "base_model.model.m.lora_A.weight",
            "base_model.model.m.lora_B.weight",
            "base_model.model.m.lora_B.bias",
        ]
    )
    assert (module.path, sorted(module.keys)) == ("m", ["lora_A", "lora_B", "lora_B.bias"])
    with pytest.raises(AdapterError, match="no lora_B key"):
        parse_keys(["m.lora_A.weight"])
    with pytest.raises(AdapterError, match="modules_to_save copy of module 'classifier'"):
        parse_keys(
            ["m.lora_A.weight", "m.lora_B.weight", "classifier.weight"], modules_to_save=["classifier"]
        )
    with pytest.raises(AdapterError, match="not a LoRA tensor"):
        parse_keys(["m.lora_A.weight", "m.lora_B.weight", "m.hada_w1_a"])


def _embedding_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="/model/embed_tokens/Gather"),
        helper.make_node("Gather", ["table2", "ids"], ["cols"], name="/model/other/Gather", axis=1),
    ]
    inits = {"table": rng_array((10, 4), 1), "table2": rng_array((10, 10), 2)}
    return make_model(nodes, {"ids": (TensorProto.INT64, [2, 3])}, ["e", "cols"], inits)


def test_gather_sites_are_found_only_when_asked() -> None:
    model = _embedding_model()
    assert not [s for s in find_sites(model).sites if s.op == "Gather"]
    scan = find_sites(model, {"gather"})
    (site,) = scan.sites
    assert (site.module_path, site.layout, site.in_features, site.out_features) == (
        "model.embed_tokens",
        "vocab,dim",
        10,
        4,
    )
    (skipped,) = scan.skipped
    assert "axis 1" in skipped.reason


def test_embedding_branch_matches_the_lookup_formula(tmp_path: Path) -> None:
    model = _embedding_model()
    a, b = rng_array((2, 10), 3), rng_array((4, 2), 4)  # PEFT: lora_embedding_A (r, vocab), _B (dim, r)
    folder = write_adapter(
        tmp_path / "a", {"model.embed_tokens.lora_embedding_A": a, "model.embed_tokens.lora_embedding_B": b}
    )
    result = lora_onnx.apply_peft(model, folder)
    ids = np.array([[0, 3, 9], [2, 2, 5]], np.int64)
    e, _ = run(result.model.proto, {"ids": ids})
    table = _weight(model, "table").astype(np.float64) + 2.0 * (b @ a).T
    assert rel_err(e, table[ids]) <= 1e-6
    assert result.branches[0].op == "Gather"
    merged = lora_onnx.merge(result.model)
    assert rel_err(np.asarray(merged.model.array("table")), table) <= 1e-6
