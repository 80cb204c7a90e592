"""ConvTranspose as an op kind (lora_onnx/kinds/conv_transpose.py): inject, fold, slots, mixed batches and
the PEFT round trip, on 1-, 2- and 3-D nodes with strides, pads, output_padding, dilations and groups.

The reference for the branch is independent of lora-onnx's graph: torch's ``conv_transpose`` of the
input with the base weight plus the branch's delta, computed here from A and B with einsum.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builders import make_model, rel_err, rng_array, run
from mixed_builders import run_rows
from onnx import TensorProto, helper, numpy_helper
from swap_builders import load_adapter, run_with, session

import lora_onnx
from lora_onnx import LoraConfig, find_sites
from lora_onnx.commands.swap import fresh_adapter, fresh_source, inject_slots
from lora_onnx.kinds import kind_of
from lora_onnx.model.load import load_model

F = TensorProto.FLOAT

#: (name, spatial dims, in, out, group, attributes): the cases every test runs on.
CASES = [
    ("1d", (9,), 4, 6, 1, {"strides": [2], "pads": [1, 0], "output_padding": [1]}),
    ("2d_grouped", (5, 6), 4, 6, 2, {"strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2]}),
    ("2d_same", (4, 4), 3, 5, 1, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    (
        "3d",
        (3, 4, 3),
        2,
        4,
        1,
        {"strides": [1, 2, 1], "pads": [0, 1, 0, 0, 1, 0], "output_padding": [0, 1, 0]},
    ),
]


def _model(spatial: tuple[int, ...], c_in: int, c_out: int, group: int, attrs: dict) -> onnx.ModelProto:
    kernel = [3] * len(spatial) if len(spatial) < 3 else [2, 3, 2]
    weight = rng_array((c_in, c_out // group, *kernel), 1)
    bias = rng_array((c_out,), 2)
    node = helper.make_node(
        "ConvTranspose", ["x", "W", "bias"], ["y"], name="/up/ConvTranspose", group=group,
        kernel_shape=kernel, **attrs,
    )  # fmt: skip
    return make_model([node], {"x": (F, ["batch", c_in, *spatial])}, ["y"], {"W": weight, "bias": bias})


def _torch_reference(model: onnx.ModelProto, x: np.ndarray, delta: np.ndarray | None = None) -> np.ndarray:
    """torch's conv_transpose of ``x`` with the model's weight (+ ``delta``), the node's attributes."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = inits["W"] + (0 if delta is None else delta)
    spatial = weight.ndim - 2
    fn = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
          torch.nn.functional.conv_transpose3d)[spatial - 1]  # fmt: skip
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    y = fn(
        torch.tensor(x, dtype=torch.float64), torch.tensor(weight, dtype=torch.float64),
        torch.tensor(inits["bias"], dtype=torch.float64),
        stride=strides, dilation=dilations, groups=int(attrs.get("group", 1)),
        output_padding=list(attrs.get("output_padding", [0] * spatial)),
    ).numpy()  # fmt: skip
    # ONNX pads crop the full output: begin pads from the start, end pads from the end (SAME_UPPER alike).
    kernel = weight.shape[2:]
    if attrs.get("auto_pad", b"NOTSET") in (b"SAME_UPPER", "SAME_UPPER"):
        pads_begin, pads_end = [], []
        for axis in range(spatial):
            total = (
                strides[axis] * (x.shape[2 + axis] - 1) + (kernel[axis] - 1) * dilations[axis] + 1
                - x.shape[2 + axis] * strides[axis]
            )  # fmt: skip
            pads_begin.append(total // 2)
            pads_end.append(total - total // 2)
    else:
        pads = list(attrs.get("pads", [0] * 2 * spatial))
        pads_begin, pads_end = pads[:spatial], pads[spatial:]
    index = tuple(
        slice(begin, y.shape[2 + axis] - end)
        for axis, (begin, end) in enumerate(zip(pads_begin, pads_end, strict=True))
    )
    return y[(slice(None), slice(None), *index)]


def _delta(a: np.ndarray, b: np.ndarray, scale: float, group: int) -> np.ndarray:
    """s * sum_r A[i, r, k] * B[g(i) * out/g + o, r] in the weight's (in, out/g, k...) layout."""
    c_in, out = a.shape[0], b.shape[0]
    in_g, out_g = c_in // group, out // group
    b2 = b.reshape(out, -1)
    delta = np.zeros((c_in, out_g, *a.shape[2:]), np.float64)
    for j in range(group):
        rows = slice(j * in_g, (j + 1) * in_g)
        delta[rows] = np.einsum("irk...,or->iok...", a[rows], b2[j * out_g : (j + 1) * out_g])
    return scale * delta


def _feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": rng_array((batch, *dims), 7)}


@pytest.mark.parametrize(
    ("name", "spatial", "c_in", "c_out", "group", "attrs"), CASES, ids=[c[0] for c in CASES]
)
def test_site_reads_every_attribute(name: str, spatial, c_in: int, c_out: int, group: int, attrs) -> None:
    model = _model(spatial, c_in, c_out, group, attrs)
    (site,) = find_sites(model).sites
    assert (site.op, site.in_features, site.out_features, site.group) == ("ConvTranspose", c_in, c_out, group)
    assert site.layout.startswith("in,out/group,")
    assert site.conv is not None and site.conv.output_padding == tuple(attrs.get("output_padding", ()))
    assert kind_of(site.op).form.name == "conv_transpose"


@pytest.mark.parametrize(
    ("name", "spatial", "c_in", "c_out", "group", "attrs"), CASES, ids=[c[0] for c in CASES]
)
def test_branch_equals_torch_with_the_delta_and_folds(
    name: str, spatial, c_in: int, c_out: int, group: int, attrs, tmp_path: Path
) -> None:
    model = _model(spatial, c_in, c_out, group, attrs)
    feeds = _feeds(model)
    base = run(model, feeds)[0]
    assert rel_err(base, _torch_reference(model, feeds["x"])) <= 1e-5  # the reference is ONNX's ConvTranspose

    unchanged = lora_onnx.inject(model, LoraConfig(rank=4), validate=True)
    assert unchanged.validation is not None and unchanged.validation.ok  # B = 0: outputs exactly the base's

    result = lora_onnx.inject(model, LoraConfig(rank=4, alpha=6, init="random", seed=3), validate=True)
    assert result.validation is not None and result.validation.ok  # the fold equals the branch
    (branch,) = result.branches
    assert (branch.kind, branch.a_group, branch.b_group) == ("conv_transpose", group, group)
    a, b = result.model.array(branch.a), result.model.array(branch.b)
    assert a.shape == (c_in, 4 // group, *a.shape[2:]) and b.shape == (
        c_out,
        4 // group,
        *([1] * len(spatial)),
    )
    injected = run(result.model.proto, feeds)[0]
    want = _torch_reference(model, feeds["x"], _delta(a, b, branch.scale, group))
    assert rel_err(injected, want) <= 1e-5
    assert rel_err(injected, base) > 1e-3  # the branch really adds something

    saved = lora_onnx.save_model(result.model, tmp_path / "injected.onnx")
    merged = lora_onnx.merge(saved, output=tmp_path / "merged.onnx", validate=True)
    assert merged.validation is not None and merged.validation.ok
    folded = onnx.load(tmp_path / "merged.onnx")
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose"]  # plain again
    assert rel_err(run(folded, feeds)[0], want) <= 1e-5


def test_rank_must_split_over_the_groups() -> None:
    model = _model((5, 6), 4, 6, 2, {"strides": [2, 1]})
    inspection = lora_onnx.inspect_model(model, LoraConfig(rank=3))
    assert not inspection.branches
    assert "rank 3 is not a multiple of the ConvTranspose's group 2" in inspection.skipped[0].reason


@pytest.mark.parametrize(
    ("name", "spatial", "c_in", "c_out", "group", "attrs"), CASES[:2], ids=["1d", "2d_grouped"]
)
def test_slots_swap_convtranspose_adapters(
    name: str, spatial, c_in: int, c_out: int, group: int, attrs, tmp_path: Path
) -> None:
    model = _model(spatial, c_in, c_out, group, attrs)
    feeds = _feeds(model, batch=3)
    slotted = inject_slots(model, LoraConfig(rank=2), output=tmp_path / "slots.onnx", validate=True)
    assert slotted.validation is not None and slotted.validation.ok
    config = LoraConfig(rank=4, alpha=3, init="random", seed=5)
    fresh_adapter(tmp_path / "slots.onnx", config, output=tmp_path / "a.onnx_adapter")
    constant = lora_onnx.save_model(lora_onnx.inject(model, config).model, tmp_path / "constant.onnx")
    sess = session(tmp_path / "slots.onnx")
    assert np.array_equal(run_with(sess, feeds)[0], run(model, feeds)[0])  # no adapter: exact zeros
    got = run_with(sess, feeds, load_adapter(tmp_path / "a.onnx_adapter"))[0]
    assert rel_err(got, run(constant, feeds)[0]) <= 1e-5
    merged = lora_onnx.merge(tmp_path / "slots.onnx", adapter_file=tmp_path / "a.onnx_adapter", validate=True)
    assert merged.validation is not None and merged.validation.ok


@pytest.mark.parametrize(
    ("name", "spatial", "c_in", "c_out", "group", "attrs"), CASES[:2], ids=["1d", "2d_grouped"]
)
def test_mixed_rows_each_run_their_adapter(
    name: str, spatial, c_in: int, c_out: int, group: int, attrs
) -> None:
    model = _model(spatial, c_in, c_out, group, attrs)
    loaded = load_model(model)
    configs = [LoraConfig(rank=r, alpha=4, init="random", seed=r) for r in (2, 4)]
    result = lora_onnx.inject_mixed(model, [fresh_source(loaded, c) for c in configs], validate=True)
    assert result.validation is not None and result.validation.ok and not result.skipped
    rows = [1, -1, 0, 1]
    feeds = _feeds(model, batch=len(rows))
    (got,) = run_rows(result.model.proto, feeds, rows)
    singles = [run(lora_onnx.inject(model, c).model.proto, feeds)[0] for c in configs]
    base = run(model, feeds)[0]
    for row, pick in enumerate(rows):
        want = base[row] if pick < 0 else singles[pick][row]
        assert rel_err(got[row], want) <= 1e-5


def test_peft_round_trip_through_export_adapter(tmp_path: Path) -> None:
    """PEFT has no ConvTranspose LoRA: lora-onnx's own export applies back, unmerged and merged."""
    model = _model((5, 6), 4, 6, 2, {"strides": [2, 1], "pads": [1, 0, 0, 1]})
    feeds = _feeds(model)
    injected = lora_onnx.inject(model, LoraConfig(rank=4, alpha=8, init="random", seed=9))
    folder = lora_onnx.export_peft_adapter(injected.model, tmp_path / "adapter")
    want = run(injected.model.proto, feeds)[0]
    applied = lora_onnx.apply_peft(model, folder, validate=True)
    assert applied.validation is not None and applied.validation.ok
    assert rel_err(run(applied.model.proto, feeds)[0], want) <= 1e-6
    merged = lora_onnx.apply_peft(model, folder, merge=True, output=tmp_path / "merged.onnx", validate=True)
    assert merged.validation is not None and merged.validation.ok
    assert rel_err(run(tmp_path / "merged.onnx", feeds)[0], want) <= 1e-5
