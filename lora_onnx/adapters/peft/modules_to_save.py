"""PEFT ``modules_to_save``: whole retrained modules (a classifier / score head, an embedding, a norm).

A sequence-classification fine-tune saves its head's full parameters beside the LoRA tensors, as
``base_model.model.<module path>.weight`` / ``.bias`` (peft 0.21; some versions write
``<module path>.modules_to_save.default.weight``). PEFT's model computes with those tensors instead of the
base's, so applying the adapter means replacing the base's tensors for that module:

- Linear exported as MatMul or Gemm (any storage: ``(out, in)`` with transB=1, pre-transposed ``(in, out)``
  MatMul weights, Transpose / Cast chains) and its bias (Gemm C, the MatMul's bias Add); Conv weight and
  bias; Embedding (Gather) table: found through the graph's sites by module path;
- norms (``LayerNormalization``, ``SimplifiedLayerNormalization``, ``RMSNormalization``,
  ``GroupNormalization``, ``InstanceNormalization`` scale / bias, or a decomposed norm's ``Mul`` / ``Add``
  on a constant): found through the module path of their nodes.

Each replaced tensor becomes a *new* initializer in the layout and type the node computes with (the
adapter's tensor transposed or reshaped as needed, shape-checked with an error naming key, node and
shapes), and only that module's nodes are rewired to it: the input model's tensors are never changed, a
tensor the exporter shared with another module keeps serving it, and a base tensor no node uses any more is
dropped. The new values are deferred (read from the adapter file when the model is saved). Which tensors
were replaced is recorded in the model's metadata (:data:`SAVED_KEY_PREFIX` + adapter), so
:func:`~lora_onnx.adapters.peft.export_peft_adapter` writes them back under their original keys.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from lora_onnx.adapters.peft.mapping import AdapterModule, graph_path_of, strip_prefix
from lora_onnx.adapters.peft.tensors import SafetensorsFile
from lora_onnx.common import json_input
from lora_onnx.common.names import nearest
from lora_onnx.errors import AdapterError, LoraOnnxError
from lora_onnx.kinds import kind_of
from lora_onnx.model.graph import (
    FreshNames,
    add_initializer,
    nodes_by_name,
    take_over,
    values_by_name,
)
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import ADAPTER_METADATA_PREFIXES, ModelMetadata, metadata_entries
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.tensors import make_deferred, np_dtype
from lora_onnx.model.weights import WeightRef, resolve_weight
from lora_onnx.sites.find import Site, SiteScan
from lora_onnx.stages.untie import drop_released

#: Metadata key prefix of the replaced-tensor records, one entry per adapter.
SAVED_KEY_PREFIX = ADAPTER_METADATA_PREFIXES[1]
_INFIX = ".modules_to_save."
#: Norm ops and the input each saved parameter replaces.
NORM_INPUTS = {
    "LayerNormalization": {"weight": 1, "bias": 2},
    "SimplifiedLayerNormalization": {"weight": 1},
    "SkipSimplifiedLayerNormalization": {"weight": 2},
    "SkipLayerNormalization": {"weight": 2, "bias": 3},
    "RMSNormalization": {"weight": 1},
    "GroupNormalization": {"weight": 1, "bias": 2},
    "InstanceNormalization": {"weight": 1, "bias": 2},
}
#: A decomposed norm (TorchScript's RMSNorm, old LayerNorm exports) multiplies by its weight, adds its bias.
_DECOMPOSED = {"weight": "Mul", "bias": "Add"}


@dataclass(frozen=True)
class SavedTensor:
    """One base tensor replaced by a saved module's tensor.

    ``key`` is the adapter key, ``module`` the module path as the adapter names it, ``param`` ``weight`` or
    ``bias``. ``name`` is the new initializer (``shape``, ONNX ``dtype``), ``replaces`` the base value the
    rewired ``inputs`` (node name, input position) read before. The stored value is the adapter's tensor
    (``peft_shape``) transposed when ``transposed``, then reshaped to ``shape``.
    """

    key: str
    module: str
    param: str
    graph_path: str
    name: str
    replaces: str
    inputs: tuple[tuple[str, int], ...]
    shape: tuple[int, ...]
    dtype: int
    peft_shape: tuple[int, ...]
    transposed: bool = False

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> SavedTensor:
        if not isinstance(data, dict):
            raise ValueError("a modules_to_save record must be an object")
        try:
            return cls(
                key=str(data["key"]),
                module=str(data["module"]),
                param=str(data["param"]),
                graph_path=str(data["graph_path"]),
                name=str(data["name"]),
                replaces=str(data["replaces"]),
                inputs=tuple((str(node), int(position)) for node, position in data["inputs"]),
                shape=tuple(int(d) for d in data["shape"]),
                dtype=int(data["dtype"]),
                peft_shape=tuple(int(d) for d in data["peft_shape"]),
                transposed=bool(data.get("transposed", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a modules_to_save record is malformed ({exc})") from exc

    def to_peft(self, stored: np.ndarray) -> np.ndarray:
        """The adapter's tensor back from the stored value."""
        value = np.asarray(stored)
        if self.transposed:
            value = value.T
        return np.ascontiguousarray(value.reshape(self.peft_shape))


def is_saved_key(name: str, modules_to_save: Sequence[str]) -> bool:
    """Whether adapter key ``name`` (prefix stripped) is a saved module's parameter."""
    from lora_onnx.sites.targets import name_matches

    if _INFIX in name:
        return True
    module = name.rpartition(".")[0]
    return bool(modules_to_save) and name_matches(module, modules_to_save)


def _split(key: str) -> tuple[str, str]:
    name = strip_prefix(key)
    if _INFIX in name:
        module, rest = name.split(_INFIX, 1)
        return module, rest.rpartition(".")[2]
    module, _, param = name.rpartition(".")
    return module, param


def plan_saved_modules(
    scan: SiteScan,
    keys: Iterable[str],
    weights: SafetensorsFile,
    adapter: str,
    graph: ir.Graph,
) -> tuple[SavedTensor, ...]:
    """Where each saved key's tensor goes (see the module doc) in ``graph`` (the model's, read only); raises
    :class:`AdapterError` for a key whose module the graph does not have, a parameter the node has no input
    for, or a shape that disagrees."""
    source = str(weights.path)
    index = _Lookup(graph, values_by_name(graph), nodes_by_name(graph), FreshNames(graph))
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        module, param = _split(key)
        if param not in ("weight", "bias"):
            raise AdapterError(
                f"{source}: key {key!r} is a modules_to_save buffer ({param}), which lora-onnx does not "
                "replace (only weight and bias); merge the adapter in PyTorch (merge_and_unload), export that"
            )
        if param in by_module[module]:
            raise AdapterError(f"{source}: keys {by_module[module][param]!r} and {key!r} are the same tensor")
        by_module[module][param] = key
    planned: list[SavedTensor] = []
    for module, params in by_module.items():
        planned.extend(_plan_module(scan, index, weights, adapter, module, params))
    return tuple(planned)


def _plan_module(
    scan: SiteScan,
    index: _Lookup,
    weights: SafetensorsFile,
    adapter: str,
    module: str,
    params: Mapping[str, str],
) -> list[SavedTensor]:
    source = str(weights.path)
    first_key = params.get("weight") or next(iter(params.values()))
    probe = AdapterModule(module, {"weight": first_key})
    site_paths: dict[str, list[Site]] = defaultdict(list)
    for site in scan.sites:
        site_paths[site.module_path].append(site)
    graph_path = graph_path_of(probe, list(site_paths), source)
    targets: dict[str, list[tuple[str, int, WeightRef, bool]]] = {}
    if graph_path is not None:
        for site in site_paths[graph_path]:
            if kind_of(site.op).packed_weight or site.weight.dequantize is not None:
                raise AdapterError(
                    f"{source}: key {first_key!r} is a modules_to_save copy of module {module!r}, whose "
                    f"{site.op} node {site.node!r} has a quantized weight; apply the adapter before "
                    "quantizing"
                )
            if site.gemm is not None and (site.gemm.alpha != 1.0 or site.gemm.beta != 1.0):
                raise AdapterError(
                    f"{source}: key {first_key!r} is a modules_to_save copy of module {module!r}, whose Gemm "
                    f"node {site.node!r} has alpha={site.gemm.alpha}, beta={site.gemm.beta}: its stored "
                    "tensors are not the PyTorch module's, so the saved ones cannot replace them"
                )
            for param, key in params.items():
                found = _site_input(index, site, param)
                if found is None:
                    raise AdapterError(
                        f"{source}: key {key!r} is the {param} of module {module!r}, but its {site.op} node "
                        f"{site.node!r} has no constant {param}; the adapter was trained on another base"
                    )
                holder, position, ref = found
                dense = param == "weight" and kind_of(site.op).linear
                transposed = dense and _transposed(ref, weights.tensors[key].shape)
                targets.setdefault(param, []).append((holder, position, ref, transposed))
    else:
        graph_path = _norm_targets(index, module, params, targets, weights, scan)
    planned = []
    for param, key in params.items():
        uses = targets[param]
        refs = {
            (ref.initializer, ref.node_shape, ref.node_dtype, transposed) for _, _, ref, transposed in uses
        }
        if len(refs) > 1:
            raise AdapterError(
                f"{source}: module {module!r} runs at nodes whose {param}s differ in layout or type "
                f"({uses[0][0]!r}, {uses[-1][0]!r}); one saved tensor cannot replace both"
            )
        _, _, ref, transposed = uses[0]
        peft_shape = weights.tensors[key].shape
        wanted = ref.node_shape[::-1] if transposed else ref.node_shape
        same = (
            tuple(peft_shape) == tuple(wanted) if param == "weight" else _numel(peft_shape) == _numel(wanted)
        )
        if not same:
            raise AdapterError(
                f"{source}: key {key!r} has shape {list(peft_shape)}, but node {uses[0][0]!r} "
                f"({graph_path}) uses {param} {ref.initializer!r} of shape {list(wanted)}; the adapter was "
                "trained on another base (a different number of labels, or a resized vocabulary?)"
            )
        name = index.names(f"{graph_path}.{adapter}.modules_to_save.{param}")
        planned.append(
            SavedTensor(
                key=key,
                module=module,
                param=param,
                graph_path=graph_path,
                name=name,
                replaces=ref.initializer,
                inputs=tuple((node, position) for node, position, _, _ in uses),
                shape=tuple(ref.node_shape),
                dtype=ref.node_dtype,
                peft_shape=tuple(peft_shape),
                transposed=transposed,
            )
        )
    return planned


def _transposed(ref: WeightRef, saved: Sequence[int]) -> bool:
    """Whether a dense node sees the saved weight transposed. PEFT saves the parameter as PyTorch stores
    it: ``(out, in)`` for Linear, ``(in, out)`` for GPT-2's Conv1D. Shapes decide, unless the weight is
    square: then a parameter-named initializer (``c_proj.weight``) is the parameter as stored, so the node
    sees it through its chain's transposes; an anonymous one (``onnx::MatMul_7``, ``val_12``) is a Linear
    weight the exporter pre-transposed."""
    node = tuple(ref.node_shape)
    if tuple(saved) != node or node != node[::-1]:
        return tuple(saved) == node[::-1] and tuple(saved) != node
    return ref.transposed if ref.initializer.endswith(".weight") else not ref.transposed


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


@dataclass(frozen=True)
class _Lookup:
    """The planned model's graph (read only) and names for the replacing tensors."""

    graph: ir.Graph
    values: dict[str, ir.Value]
    nodes: dict[str, ir.Node]
    names: FreshNames


#: Input position meaning "the node has no bias: add an Add after it" (a MatMul whose zero bias the
#: exporter dropped; a Gemm or Conv without one takes it as a new input instead).
ADD_AFTER = -1


def _site_input(index: _Lookup, site: Site, param: str) -> tuple[str, int, WeightRef] | None:
    """(node, input position, traced tensor) of ``param`` at a site; a MatMul's bias is its Add's input.

    A bias the graph lacks (exporters drop zero biases; PEFT still saves them) gets a place: Gemm C or
    Conv B as a new input, an Add after a MatMul (:data:`ADD_AFTER`); its tensor is then ``(out,)``.
    None when the bias is there but not a constant.
    """
    node = index.nodes[site.node]
    kind = kind_of(site.op)
    missing = WeightRef("", (site.out_features,), site.dtype, (site.out_features,), site.dtype)
    if param == "weight":
        holder, position = node, kind.weight_input
    elif kind.bias_input:
        holder, position = node, 2
        if len(node.inputs) <= position or node.inputs[position] is None:
            return node.name, position, missing
    elif kind.bias_after:
        found = _matmul_bias(node, site.out_features)
        if found is None:
            return node.name, ADD_AFTER, missing
        holder, position = found
    else:
        return None
    if len(holder.inputs) <= position or holder.inputs[position] is None:
        return None
    ref = resolve_weight(holder.inputs[position])
    assert holder.name is not None
    return (holder.name, position, ref) if isinstance(ref, WeightRef) else None


def _matmul_bias(node: ir.Node, out: int) -> tuple[ir.Node, int] | None:
    """The Add after a MatMul that adds a constant ``(out,)`` bias (where Linear's bias went), if any."""
    output = node.outputs[0]
    readers = list(output.uses())
    if len(readers) != 1 or readers[0].node.op_type != "Add":
        return None
    add = readers[0].node
    position = 1 - readers[0].idx
    ref = resolve_weight(add.inputs[position])
    if isinstance(ref, WeightRef) and ref.node_shape in ((out,), (1, out)):
        return add, position
    return None


def _norm_targets(
    index: _Lookup,
    module: str,
    params: Mapping[str, str],
    targets: dict[str, list[tuple[str, int, WeightRef, bool]]],
    weights: SafetensorsFile,
    scan: SiteScan,
) -> str:
    """Fill ``targets`` from the norm nodes of ``module``; returns the graph module path."""
    source = str(weights.path)
    first_key = params.get("weight") or next(iter(params.values()))
    paths: dict[str, list[ir.Node]] = defaultdict(list)
    for node in index.graph:
        paths[module_path(node, None)].append(node)
    graph_path = graph_path_of(AdapterModule(module, {"weight": first_key}), list(paths), source)
    if graph_path is None:
        known = sorted({site.module_path for site in scan.sites} | set(paths))
        raise AdapterError(
            f"{source}: key {first_key!r} is a modules_to_save copy of module {module!r}, which matches no "
            f"module of the graph; nearest module paths: {', '.join(nearest(module, known, dotted=True))}"
        )
    nodes = paths[graph_path]
    fused = [node for node in nodes if node.op_type in NORM_INPUTS]
    for param, key in params.items():
        found: list[tuple[str, int, WeightRef, bool]] = []
        for node in fused:
            position = NORM_INPUTS[node.op_type].get(param)
            if position is not None and len(node.inputs) > position and node.inputs[position] is not None:
                ref = resolve_weight(node.inputs[position])
                if isinstance(ref, WeightRef):
                    found.append((str(node.name), position, ref, False))
        if not found and not fused:
            for node in nodes:
                if node.op_type != _DECOMPOSED[param]:
                    continue
                for position, value in enumerate(node.inputs):
                    constant = value is not None and value.is_initializer()
                    ref = resolve_weight(value) if constant else None
                    if isinstance(ref, WeightRef) and _numel(ref.node_shape) == _numel(
                        weights.tensors[key].shape
                    ):
                        found.append((str(node.name), position, ref, False))
        if len(found) != 1 and not (found and fused):
            ops = sorted({node.op_type for node in nodes})
            raise AdapterError(
                f"{source}: key {key!r} is the {param} of modules_to_save module {module!r}, but graph "
                f"module {graph_path!r} ({', '.join(ops)} nodes) has {'no' if not found else 'several'} "
                f"constant {param} input{'s' if found else ''} lora-onnx can replace; supported are Linear, "
                "Conv, Embedding and norm modules"
            )
        targets[param] = found
    return graph_path


def replace_saved(
    model: LoadedModel, saved: Sequence[SavedTensor], weights: SafetensorsFile, adapter: str
) -> LoadedModel:
    """A copy of ``model`` whose saved modules' nodes read new initializers holding the adapter's tensors."""
    if not saved:
        return model
    rewritten = model.to_ir()
    graph = rewritten.graph
    names = FreshNames(graph)
    nodes = nodes_by_name(graph)
    producers = {}
    released: list[ir.Value] = []
    earlier = {
        t.name: key.removeprefix(SAVED_KEY_PREFIX)
        for key, _ in metadata_entries(model.ir_model)
        if key.startswith(SAVED_KEY_PREFIX)
        for t in read_saved(model.ir_model, key.removeprefix(SAVED_KEY_PREFIX))
    }
    for tensor in saved:
        names.reserve(tensor.name)
        value = add_initializer(graph, make_deferred(tensor.name, tensor.shape, tensor.dtype))
        producers[tensor.name] = _producer(weights, tensor)
        for node_name, position in tensor.inputs:
            node = nodes.get(node_name)
            if node is None:
                raise LoraOnnxError(f"node {node_name!r} changed while modules_to_save was applied")
            if position == ADD_AFTER:
                graph.insert_after(node, _bias_add(names, node, tensor, value))
                continue
            if len(node.inputs) <= position:
                node.resize_inputs(position + 1)
                node.replace_input_with(position, value)
                continue
            replaced = node.inputs[position]
            if replaced is not None and replaced.name in earlier:
                raise AdapterError(
                    f"module {tensor.module!r} was already replaced by adapter "
                    f"{earlier[replaced.name]!r}'s modules_to_save; apply this adapter to the base model"
                )
            if replaced is not None:
                released.append(replaced)
            node.replace_input_with(position, value)
    drop_released(graph, released)  # the replaced base tensors and their chains, unless shared
    write_saved(rewritten, adapter, saved)
    return model.with_ir(rewritten, producers)


def _bias_add(names: FreshNames, node: ir.Node, tensor: SavedTensor, bias: ir.Value) -> ir.Node:
    """``y = MatMul(...) + bias`` for a MatMul whose bias the exporter dropped: the MatMul now produces a
    new value, the Add the old one (every reader keeps its input)."""
    product = node.outputs[0]
    joined = product.name
    product.name = names(f"{joined}.{tensor.name}.input")
    name = names(f"{tensor.graph_path}.modules_to_save.bias_add")
    add = ir.node("Add", [product, bias], name=name, outputs=[ir.Value(name=joined)])
    take_over(product, add.outputs[0], keep=[add])
    return add


def _producer(weights: SafetensorsFile, tensor: SavedTensor):  # type: ignore[no-untyped-def]
    def produce() -> np.ndarray:
        value = np.asarray(weights.read(tensor.key))
        if tensor.transposed:
            value = value.T
        return np.ascontiguousarray(value.reshape(tensor.shape), np_dtype(tensor.dtype))

    return produce


def write_saved(model: ir.Model, adapter: str, saved: Sequence[SavedTensor]) -> None:
    """Record ``saved`` for ``adapter`` in ``model``'s metadata (replacing an earlier record)."""
    key = SAVED_KEY_PREFIX + adapter
    model.metadata_props.pop(key, None)
    model.metadata_props[key] = json.dumps([tensor.to_json() for tensor in saved], separators=(",", ":"))


def read_saved(model: ModelMetadata, adapter: str) -> tuple[SavedTensor, ...]:
    """The tensors ``adapter``'s modules_to_save replaced in ``model`` (empty when none)."""
    for key, text in metadata_entries(model):
        if key == SAVED_KEY_PREFIX + adapter:
            try:
                data = json_input.loads(text)
                if not isinstance(data, list):
                    raise ValueError("expected a list")
                return tuple(SavedTensor.from_json(item) for item in data)
            except ValueError as exc:
                raise LoraOnnxError(f"the model's {key} metadata is unreadable: {exc}") from exc
    return ()


def refuse_saved_modules(model: LoadedModel, adapter: str) -> None:
    """Refuse to export ``adapter`` as slot tensors when its modules_to_save replaced base tensors: an
    adapter file holds LoRA tensors only, so the head would silently stay the base's."""
    saved = read_saved(model.ir_model, adapter)
    if saved:
        modules = ", ".join(dict.fromkeys(tensor.module for tensor in saved))
        raise AdapterError(
            f"{model.name}: adapter {adapter!r} replaced the base's tensors of modules_to_save module(s) "
            f"{modules}, which an adapter file for LoRA slots cannot carry; export it as a PEFT folder "
            "(--format peft), or apply it as constant branches"
        )
