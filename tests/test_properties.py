"""Property tests: random small graphs of Gemm, MatMul and Conv with random attributes and ranks.

Each example builds a graph of 1-4 independent blocks, every block one node with a constant weight:
Gemm (transA, transB, alpha, beta, bias shapes), MatMul (1-4-d data, optional bias Add) and Conv (1-3-d,
strides, pads or auto_pad, dilations, groups incl. depthwise, bias), weights sometimes reached through
Identity or Transpose, plus nodes that can take no branch (dynamic or 3-d weights). Properties, checked
in onnxruntime against the base graph run directly:

- zero-init inject leaves every output unchanged;
- merge of a random-init inject equals the inject (and has the base's nodes);
- inspect's site count equals the eligible nodes, and the rest are skipped with a reason.

Examples are derandomized (the same every run) and few by default; LORA_ONNX_HYPOTHESIS_EXAMPLES raises it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lora_onnx import LoraConfig, find_sites, inject, inspect_model, merge

EXAMPLES = int(os.environ.get("LORA_ONNX_HYPOTHESIS_EXAMPLES", "20"))
PROFILE = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Graph:
    """A generated model, its feeds, and what the test expects of it."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    eligible: int
    ineligible: int
    ranks: dict[str, int]  # module path -> rank (a multiple of the conv's group)
    groups: dict[str, int]  # module path -> conv group (1 for dense)


class Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.feeds: dict[str, np.ndarray] = {}

    def data(self, name: str, shape: tuple[int, ...]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.feeds[name] = self.rng.standard_normal(shape).astype(np.float32)
        return name

    def const(self, name: str, shape: tuple[int, ...]) -> str:
        values = self.rng.standard_normal(shape).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], chain: str) -> str:
        """A weight the node sees with ``shape``, stored directly or behind an Identity / Transpose."""
        if chain == "transpose":
            stored = self.const(name, shape[::-1])
            self.nodes.append(
                helper.make_node("Transpose", [stored], [f"{name}_t"], f"{name}_T", perm=[1, 0])
            )
            return f"{name}_t"
        stored = self.const(name, shape)
        if chain == "identity":
            self.nodes.append(helper.make_node("Identity", [stored], [f"{name}_id"], f"{name}_Id"))
            return f"{name}_id"
        return stored

    def output(self, name: str) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "random", self.inputs, self.outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


dims = st.integers(1, 5)


@st.composite
def gemm_block(draw: st.DrawFn, b: Builder, i: int) -> tuple[int, int]:
    m, k, n = draw(dims), draw(dims), draw(dims)
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    alpha = draw(st.sampled_from([1.0, 0.5, 2.0, -1.5]))
    beta = draw(st.sampled_from([1.0, 0.0, 0.5]))
    bias = draw(st.sampled_from(["none", "n", "1n", "mn"]))
    x = b.data(f"x{i}", (k, m) if trans_a else (m, k))
    chain = draw(st.sampled_from(["direct", "identity", "transpose"]))
    w = b.weight(f"b{i}.weight", (n, k) if trans_b else (k, n), chain)
    inputs = [x, w]
    if bias != "none":
        inputs.append(b.const(f"b{i}.bias", {"n": (n,), "1n": (1, n), "mn": (m, n)}[bias]))
    b.nodes.append(
        helper.make_node(
            "Gemm", inputs, [f"y{i}"], f"n{i}", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b
        )
    )
    b.output(f"y{i}")
    return 1, 1


@st.composite
def matmul_block(draw: st.DrawFn, b: Builder, i: int) -> tuple[int, int]:
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    k, n = draw(dims), draw(dims)
    x = b.data(f"x{i}", (*batch, k))
    w = b.weight(f"b{i}.weight", (k, n), draw(st.sampled_from(["direct", "identity", "transpose"])))
    if draw(st.booleans()):
        b.nodes.append(helper.make_node("MatMul", [x, w], [f"h{i}"], f"n{i}"))
        b.nodes.append(
            helper.make_node("Add", [b.const(f"b{i}.bias", (n,)), f"h{i}"], [f"y{i}"], f"n{i}_bias")
        )
    else:
        b.nodes.append(helper.make_node("MatMul", [x, w], [f"y{i}"], f"n{i}"))
    b.output(f"y{i}")
    return 1, 1


@st.composite
def conv_block(draw: st.DrawFn, b: Builder, i: int) -> tuple[int, int]:
    spatial = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    group = draw(st.integers(1, 3))
    cin_g = 1 if depthwise else draw(st.integers(1, 2))
    cout_g = draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
    strides = [draw(st.integers(1, 2)) for _ in range(spatial)]
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime runs no dilated conv with SAME_* padding
    dilations = [1 if auto_pad.startswith("SAME") else draw(st.integers(1, 2)) for _ in range(spatial)]
    reach = [d * (k - 1) + 1 for d, k in zip(dilations, kernel, strict=True)]
    # keep 3-d volumes small: the suite runs on two cores
    sizes = [r + draw(st.integers(0, 2 if spatial == 3 else 4)) for r in reach]
    x = b.data(f"x{i}", (draw(st.integers(1, 2)), group * cin_g, *sizes))
    w = b.const(f"b{i}.weight", (group * cout_g, cin_g, *kernel))
    inputs = [x, w] + ([b.const(f"b{i}.bias", (group * cout_g,))] if draw(st.booleans()) else [])
    attrs: dict[str, object] = {
        "kernel_shape": kernel,
        "strides": strides,
        "dilations": dilations,
        "group": group,
    }
    if auto_pad == "NOTSET":
        begins = [draw(st.integers(0, r - 1)) for r in reach]
        symmetric = draw(st.booleans())
        ends = begins if symmetric else [draw(st.integers(0, r - 1)) for r in reach]
        attrs["pads"] = begins + ends
    else:
        attrs["auto_pad"] = auto_pad
    b.nodes.append(helper.make_node("Conv", inputs, [f"y{i}"], f"n{i}", **attrs))
    b.output(f"y{i}")
    return 1, group


@st.composite
def ineligible_block(draw: st.DrawFn, b: Builder, i: int) -> tuple[int, int]:
    k, n = draw(dims), draw(dims)
    x = b.data(f"x{i}", (2, k))
    if draw(st.booleans()):
        w = b.data(f"w{i}", (k, n))  # a graph input: changes per run, no constant weight
    else:
        x = b.data(f"x{i}_3d", (3, 2, k))
        w = b.const(f"b{i}.weight", (3, k, n))  # a batched (3-d) weight
    b.nodes.append(helper.make_node("MatMul", [x, w], [f"y{i}"], f"n{i}"))
    b.output(f"y{i}")
    return 0, 0


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    b = Builder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    kinds = draw(st.lists(st.sampled_from(["gemm", "matmul", "conv", "none"]), min_size=1, max_size=4))
    if all(kind == "none" for kind in kinds):
        kinds.append("matmul")
    blocks = {"gemm": gemm_block, "matmul": matmul_block, "conv": conv_block, "none": ineligible_block}
    eligible = ineligible = 0
    ranks: dict[str, int] = {}
    groups: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        sites, group = draw(blocks[kind](b, i))
        event(f"{kind} block" + (f", group {group}" if kind == "conv" else ""))
        if sites:
            eligible += 1
            groups[f"b{i}"] = group
            ranks[f"b{i}"] = group * draw(st.integers(1, 4 if group == 1 else 2))
        else:
            ineligible += 1
    return Graph(b.model(), b.feeds, eligible, ineligible, ranks, groups)


def run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def recipe(graph: Graph, init: str) -> LoraConfig:
    pattern = {path: rank for path, rank in graph.ranks.items()}
    return LoraConfig(
        rank=1, init=init, seed=3, rank_pattern=pattern, alpha_pattern={k: 2 * v for k, v in pattern.items()}
    )


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    diff = float(np.abs(reference - candidate).max()) if reference.size else 0.0
    return diff / scale if scale else diff


@PROFILE
@given(graph=graphs())
def test_zero_init_inject_equals_base(graph: Graph, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("zero") / "lora.onnx"
    result = inject(graph.model, recipe(graph, "default"), output=out)
    assert len(result.branches) == graph.eligible
    base, injected = run(graph.model, graph.feeds), run(out, graph.feeds)
    for expected, actual in zip(base, injected, strict=True):
        assert expected.shape == actual.shape
        assert relative_error(expected, actual) <= 1e-6


@PROFILE
@given(graph=graphs())
def test_merge_of_random_inject_equals_inject(graph: Graph, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("merge")
    inject(graph.model, recipe(graph, "random"), output=folder / "lora.onnx")
    merge(folder / "lora.onnx", output=folder / "merged.onnx")
    base = run(graph.model, graph.feeds)
    injected, merged = run(folder / "lora.onnx", graph.feeds), run(folder / "merged.onnx", graph.feeds)
    for expected, actual in zip(injected, merged, strict=True):
        assert relative_error(expected, actual) <= 1e-4
    assert max(relative_error(b, i) for b, i in zip(base, injected, strict=True)) > 1e-3, "the branches act"
    merged_nodes = [n.op_type for n in onnx.load(folder / "merged.onnx").graph.node]
    assert merged_nodes == [n.op_type for n in graph.model.graph.node]


@PROFILE
@given(graph=graphs(), misfit=st.booleans())
def test_inspect_counts_the_eligible_nodes(graph: Graph, misfit: bool) -> None:
    scan = find_sites(graph.model)
    assert len(scan.sites) == graph.eligible and len(scan.skipped) == graph.ineligible
    assert all(skip.reason for skip in scan.skipped)
    config = recipe(graph, "default")
    grouped = [path for path, group in graph.groups.items() if group > 1]
    if misfit and grouped:  # a rank the group does not divide: skipped with that reason, not dropped
        config = LoraConfig(rank=1, rank_pattern={**graph.ranks, grouped[0]: graph.groups[grouped[0]] + 1})
    inspection = inspect_model(graph.model, config)
    misfits = [s for s in inspection.skipped if "not a multiple of the conv's group" in s.reason]
    assert len(inspection.sites) + len(misfits) == graph.eligible
    assert len(misfits) == (1 if misfit and grouped else 0)
    assert {row.module_path: row.rank for row in inspection.sites} == {
        path: rank for path, rank in graph.ranks.items() if not (misfits and path == grouped[0])
    }
    expected_params = sum(math.prod(row.a_shape) + math.prod(row.b_shape) for row in inspection.sites)
    assert inspection.lora_params == expected_params
