"""The in-memory graph: onnx-ir (the ONNX project's IR), and what the stages need on top of it.

Stages read and rewrite an :class:`onnx_ir.Model` (:func:`to_ir`): its use-def chains (``value.uses()``,
``value.producer()``), ``graph.insert_after`` and :class:`onnx_ir.tape.Tape` replace hand-made indexes and
node lists. The model is turned back into a ``ModelProto`` (:func:`to_proto`) for lora-onnx's own save
(which streams tensors and links unchanged data) and for onnxruntime. Neither direction reads a tensor's
bytes: external tensors stay references and inline ones wrap their protos.

Records between stages (sites, branch records) name values and nodes, so :class:`FreshNames` gives new
names the way lora-onnx always has (``wanted``, ``wanted_1``, ...) and :func:`values_by_name` /
:func:`nodes_by_name` lead from a record's names back to the graph's objects.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx
import onnx_ir as ir
from onnx_ir import serde

#: ``ir.Value.meta`` key marking an initializer the source listed in its value_info (see :func:`to_proto`).
_LISTED = "lora_onnx.listed_in_value_info"


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    """``proto`` as an onnx-ir model that can be edited without changing ``proto`` (no tensor is read)."""
    model = serde.deserialize_model(proto)
    listed = {info.name for info in proto.graph.value_info}
    for name, value in model.graph.initializers.items():
        if name in listed:
            value.meta[_LISTED] = True
    return model


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a ``ModelProto``.

    onnx-ir writes a value_info for every typed initializer; only those the source listed (dynamo lists
    its parameters, an optimizer's ``folded_from`` lives there) are kept, so a round trip adds nothing.
    """
    proto = serde.serialize_model(model)
    graph = proto.graph
    unlisted = {name for name, value in model.graph.initializers.items() if not value.meta.get(_LISTED)}
    if unlisted:
        kept = [info for info in graph.value_info if info.name not in unlisted]
        if len(kept) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
    return proto


class FreshNames:
    """Unique names for new values and nodes of one graph: ``wanted``, else ``wanted_1``, ``wanted_2``...

    Values and nodes share one name space (as lora-onnx's records and reports always have); a name
    returned, or :meth:`reserve` d, is never returned again.
    """

    def __init__(self, graph: ir.Graph) -> None:
        taken = {value.name for value in graph.inputs} | set(graph.initializers)
        for node in graph:
            taken.add(node.name)
            taken.update(value.name for value in node.outputs)
        taken.discard(None)
        self._taken: set[str] = taken  # type: ignore[assignment]

    def __call__(self, wanted: str) -> str:
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


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value of the main graph by name: inputs, initializers and node outputs."""
    values: dict[str, ir.Value] = {value.name: value for value in graph.inputs if value.name}
    values.update(graph.initializers)
    for node in graph:
        values.update((value.name, value) for value in node.outputs if value.name)
    return values


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node.name: node for node in graph if node.name}


def attribute_values(node: ir.Node) -> dict[str, object]:
    """The node's attributes as plain Python values (ints, floats, lists, tensors)."""
    return {name: attr.value for name, attr in node.attributes.items()}


def add_initializer(graph: ir.Graph, tensor: onnx.TensorProto) -> ir.Value:
    """Register ``tensor`` (values, or metadata only for a tensor produced at save time) as an
    initializer of ``graph``; its bytes are not copied."""
    wrapped = ir.TensorProtoTensor(tensor)
    value = ir.Value(name=tensor.name, shape=wrapped.shape, type=ir.TensorType(wrapped.dtype))
    value.const_value = wrapped
    graph.register_initializer(value)
    return value


def take_over(old: ir.Value, new: ir.Value, *, keep: Collection[ir.Node] = ()) -> None:
    """Make ``new`` replace ``old`` for every reader except the nodes in ``keep`` (the branch that reads
    ``old``), graph outputs included; ``new`` takes ``old``'s type, shape and metadata.

    The declared shape moves rather than copies: a graph output may declare a fixed batch its inputs do not,
    and onnxruntime would fold a ``Shape`` of ``old`` (a mixed branch reads one) into that constant.
    """
    new.type, new.shape = old.type, old.shape
    old.shape = None
    new.doc_string = old.doc_string
    for key, item in old.metadata_props.items():
        new.metadata_props[key] = item
    old.metadata_props.clear()
    kept = set(map(id, keep))
    for use in list(old.uses()):
        if id(use.node) not in kept:
            use.node.replace_input_with(use.idx, new)
    graph = old.graph
    if graph is not None and old.is_graph_output():
        for position, output in enumerate(graph.outputs):
            if output is old:
                graph.outputs[position] = new
