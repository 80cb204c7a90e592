"""A read-only index over a graph: who produces and who consumes each value, and fresh unique names."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import onnx


class GraphIndex:
    """Lookups over one ``GraphProto``, built once per stage (the graph must not change meanwhile)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.nodes: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.position: dict[str, int] = {}
        for index, node in enumerate(graph.node):
            self.nodes[node.name] = node
            self.position[node.name] = index
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_inputs = {value.name for value in graph.input}
        self.graph_outputs = {value.name for value in graph.output}
        self.value_info = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
        self._taken = set(self.initializers) | set(self.nodes) | set(self.producer) | self.graph_inputs

    def is_constant(self, name: str) -> bool:
        """A value with a value at load time: an initializer.

        Initializers also listed as graph inputs count too: IR < 4 requires that listing and
        ``keep_initializers_as_inputs=True`` exports use it, yet those tensors are the model's weights.
        """
        return name in self.initializers

    def elem_type(self, name: str) -> int | None:
        """The element type of a value from initializers or value_info, None when unknown."""
        if name in self.initializers:
            return self.initializers[name].data_type
        info = self.value_info.get(name)
        if info is not None and info.type.HasField("tensor_type"):
            return info.type.tensor_type.elem_type or None
        return None

    def attributes(self, node: onnx.NodeProto) -> dict[str, object]:
        return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}

    def unique_name(self, wanted: str) -> str:
        """``wanted``, or ``wanted_1``, ``wanted_2``... if taken; the name returned is reserved."""
        name, suffix = wanted, 0
        while name in self._taken:
            suffix += 1
            name = f"{wanted}_{suffix}"
        self._taken.add(name)
        return name

    def is_free(self, name: str) -> bool:
        return name not in self._taken

    def reserve(self, name: str) -> None:
        self._taken.add(name)


def retain(field: Any, keep: Callable[[Any], bool]) -> None:
    """Keep, in place and in order, the items of a protobuf repeated field for which ``keep`` is true."""
    kept = [item for item in field if keep(item)]
    del field[:]
    field.extend(kept)


def splice_nodes(
    graph: onnx.GraphProto,
    *,
    before: Mapping[str, Iterable[onnx.NodeProto]] | None = None,
    after: Mapping[str, Iterable[onnx.NodeProto]] | None = None,
    first: Iterable[onnx.NodeProto] = (),
) -> None:
    """Insert new nodes next to the existing nodes they are keyed by (node name), or ``first``.

    Placing a node's readers right after it and its feeders right before it keeps the graph sorted.
    """
    before, after = before or {}, after or {}
    ordered = list(first)
    for node in graph.node:
        ordered.extend(before.get(node.name, ()))
        ordered.append(node)
        ordered.extend(after.get(node.name, ()))
    del graph.node[:]
    graph.node.extend(ordered)


def rename_output(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node`` produce ``new`` where it produced ``old``."""
    node.output[list(node.output).index(old)] = new
