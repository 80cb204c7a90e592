"""The mixed-batch stage's graph edits (on onnx-ir): where its nodes go, and that leaving the mixed form
gives back the host graph."""

from __future__ import annotations

import numpy as np
import onnx
from builders import run
from mixed_builders import run_rows
from swap_builders import mixed_feeds, mixed_model

from lora_onnx import LoraConfig
from lora_onnx.commands.inject_mixed import MixedInjectResult, inject_mixed
from lora_onnx.commands.swap import fresh_source
from lora_onnx.model.load import load_model
from lora_onnx.stages.contract import check_graph
from lora_onnx.stages.stacked import INDEX_INPUT, mixed_info, pin_index, strip_mixed


def _graph(proto: onnx.ModelProto) -> dict[str, object]:
    graph = proto.graph
    return {
        "nodes": [(n.name, n.op_type, list(n.input), list(n.output)) for n in graph.node],
        "inputs": [v.name for v in graph.input],
        "outputs": [v.name for v in graph.output],
        "initializers": [t.name for t in graph.initializer],
    }


def _mixed(stacks_as_inputs: bool) -> tuple[onnx.ModelProto, MixedInjectResult]:
    base = mixed_model()
    loaded = load_model(base)
    adapters = [fresh_source(loaded, LoraConfig(rank=r, init="random", seed=r)) for r in (2, 3)]
    return base, inject_mixed(base, adapters, stacks_as_inputs=stacks_as_inputs)


def test_branches_follow_their_producer_and_shared_nodes_come_first() -> None:
    base, result = _mixed(stacks_as_inputs=False)
    mixed = result.model
    check_graph(mixed, "test")
    names = [node.name for node in mixed.proto.graph.node]
    info = mixed_info(mixed)
    assert info is not None and names[: len(info.nodes)] == list(info.nodes)
    producers = {out: node.name for node in base.graph.node for out in node.output}
    for record in result.branches:
        start = names.index(producers[record.join]) + 1
        assert names[start : start + len(record.nodes)] == list(record.nodes)
        assert names[start + len(record.nodes) - 1].endswith(".lora_add")
    outputs = {out for node in mixed.proto.graph.node for out in node.output}
    for record in result.branches:  # the base output is renamed, the Add writes the old name
        assert record.base_join in outputs and record.join in outputs


def test_strip_gives_back_the_host_graph_and_pin_equals_a_constant_index() -> None:
    for stacks_as_inputs in (False, True):
        base, result = _mixed(stacks_as_inputs)
        stripped = strip_mixed(result.model)
        assert _graph(stripped.proto) == _graph(load_model(base).proto)
        live = {v.name for v in stripped.proto.graph.input} | {
            out for node in stripped.proto.graph.node for out in node.output
        }
        assert all(info.name in live for info in stripped.proto.graph.value_info)
        assert mixed_info(stripped) is None
        feeds = mixed_feeds(batch=3)
        for got, want in zip(run(stripped.proto, feeds), run(base, feeds), strict=True):
            assert np.array_equal(got, want)
        pinned = pin_index(result.model, 1)
        check_graph(pinned, "test")
        assert INDEX_INPUT not in {v.name for v in pinned.proto.graph.input}
        for got, want in zip(
            run(pinned.proto, feeds), run_rows(result.model.proto, feeds, [1, 1, 1]), strict=True
        ):
            assert np.array_equal(got, want)


def test_a_fixed_output_shape_does_not_fix_the_branch_batch() -> None:
    """An output may declare a batch its symbolic inputs do not (3 here): the branch still follows the
    run's batch (the base output's Shape is not folded into the declared one)."""
    base = mixed_model()
    for output in base.graph.output:
        if output.name == "y":
            output.type.tensor_type.shape.dim[0].dim_value = 3
    loaded = load_model(base)
    adapters = [fresh_source(loaded, LoraConfig(rank=r, init="random", seed=r)) for r in (2, 3)]
    mixed = inject_mixed(base, adapters).model
    feeds = mixed_feeds(batch=2)
    for got, want in zip(run_rows(mixed.proto, feeds, [-1, -1]), run(base, feeds), strict=True):
        assert np.array_equal(got, want)
