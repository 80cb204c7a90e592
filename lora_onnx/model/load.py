"""Load a model's graph without its weights.

Everything downstream works on a graph-only ``ModelProto``: initializers stored as external data keep just
their metadata (dims, data type, location), so a multi-GB model costs what its graph costs. Loading also
checks what a later stage would otherwise trip over: a missing or truncated data file, a location that
escapes the model's folder (by ``..``, an absolute path or a symbolic link), malformed external_data
entries, a graph that is not topologically sorted or refers to undefined values, and a lora-onnx
manifest that is malformed or names nodes / tensors the graph lacks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from lora_onnx.common import progress
from lora_onnx.errors import FoldError, LoraOnnxError, ModelLoadError
from lora_onnx.model.graph import to_ir, to_proto
from lora_onnx.model.manifest import check_branches
from lora_onnx.model.tensors import (
    ExternalRef,
    data_file,
    external_ref,
    nbytes,
    read_array,
    shape_of,
    type_name,
)

#: Produces a tensor's new value when the model is saved (folding streams one weight at a time).
TensorProducer = Callable[[], np.ndarray]


@dataclass(frozen=True)
class LoadedModel:
    """A graph-only model and the folder its external data locations are relative to.

    ``ir_model`` is the graph as onnx-ir holds it (:mod:`lora_onnx.model.graph`), owned by this record:
    stages rewrite a copy (:meth:`to_ir`) and return a new record (:meth:`with_ir`), so a caller's model
    is never modified. :attr:`proto` is its ``ModelProto`` (made on first use) for lora-onnx's save,
    onnxruntime and the manifest; treat it as read-only. ``path`` is the file it came from (None for a
    model built in memory). ``overrides`` maps initializer names to producers of their new values,
    computed only when the model is saved.
    """

    ir_model: ir.Model
    path: Path | None = None
    base_dir: Path | None = None
    overrides: Mapping[str, TensorProducer] = field(default_factory=dict)

    @classmethod
    def from_proto(
        cls,
        proto: onnx.ModelProto,
        path: Path | None = None,
        base_dir: Path | None = None,
        overrides: Mapping[str, TensorProducer] | None = None,
    ) -> LoadedModel:
        """A record of ``proto``, which it then owns (the caller must not change it)."""
        loaded = cls(to_ir(proto), path, base_dir, dict(overrides or {}))
        loaded.__dict__["proto"] = proto  # the proto it was made from is its serialised form
        return loaded

    @cached_property
    def proto(self) -> onnx.ModelProto:
        """The model as a ``ModelProto``, serialised by onnx-ir (no tensor bytes are read)."""
        return to_proto(self.ir_model)

    @property
    def name(self) -> str:
        """A short label for messages: the file name, or the graph name for in-memory models."""
        return self.path.name if self.path else (self.ir_model.graph.name or "<in-memory model>")

    def external_files(self) -> list[Path]:
        """Every data file the model's initializers refer to, resolved against ``base_dir``."""
        if self.base_dir is None:
            return []
        locations = {ref.location for ref in self.external_refs().values()}
        return [self.base_dir / location for location in sorted(locations)]

    def external_refs(self) -> dict[str, ExternalRef]:
        """Tensor name -> where its bytes live, for tensors stored as external data."""
        return dict(self._external_refs)

    @cached_property
    def _external_refs(self) -> dict[str, ExternalRef]:
        # Worked out once per record (it never changes): the save and the output checks ask several times.
        refs = {}
        for tensor in all_tensors(self.proto.graph):
            ref = external_ref(tensor)
            if ref is not None:
                refs[tensor.name] = ref
        return refs

    def initializer(self, name: str) -> onnx.TensorProto:
        """The initializer ``name`` as a ``TensorProto`` (KeyError when the graph has none)."""
        return self._initializers[name]

    @cached_property
    def _initializers(self) -> dict[str, onnx.TensorProto]:
        found: dict[str, onnx.TensorProto] = {}
        for tensor in self.proto.graph.initializer:
            found.setdefault(tensor.name, tensor)  # the first of a repeated name, as before
        return found

    def array(self, name: str) -> np.ndarray:
        """An initializer's current value (an override's, else read or memory-mapped from the source)."""
        if name in self.overrides:
            return self.overrides[name]()
        return read_array(self.initializer(name), self.base_dir, self.path)

    def with_proto(
        self, proto: onnx.ModelProto, overrides: Mapping[str, TensorProducer] | None = None
    ) -> LoadedModel:
        """The same source (path, data folder) with another graph, e.g. a rewritten copy.

        Overrides carry over, plus ``overrides``, except those of tensors ``proto`` no longer has.
        """
        present = {tensor.name for tensor in proto.graph.initializer}
        return LoadedModel.from_proto(proto, self.path, self.base_dir, self._overrides(present, overrides))

    def to_ir(self) -> ir.Model:
        """The graph as an onnx-ir model a stage can rewrite: a copy (tensors shared, never edited)."""
        return self.ir_model.clone()

    def with_ir(self, model: ir.Model, overrides: Mapping[str, TensorProducer] | None = None) -> LoadedModel:
        """:meth:`with_proto` for a graph a stage rewrote in onnx-ir (which the new record then owns)."""
        present = set(model.graph.initializers)
        return LoadedModel(model, self.path, self.base_dir, self._overrides(present, overrides))

    def with_overrides(self, overrides: Mapping[str, TensorProducer]) -> LoadedModel:
        """The same graph with more tensors produced at save time (the graph itself is shared)."""
        present = set(self.ir_model.graph.initializers)
        return LoadedModel(self.ir_model, self.path, self.base_dir, self._overrides(present, overrides))

    def _overrides(
        self, present: set[str], overrides: Mapping[str, TensorProducer] | None
    ) -> dict[str, TensorProducer]:
        return {k: v for k, v in {**self.overrides, **(overrides or {})}.items() if k in present}


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes (Constant values), including those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


ModelLike = str | os.PathLike | onnx.ModelProto | LoadedModel


def load_model(
    model: ModelLike, *, base_dir: str | os.PathLike | None = None, check_manifest: bool = True
) -> LoadedModel:
    """Load ``model`` (a path, a ``ModelProto`` or a :class:`LoadedModel`) graph-only and check it.

    A ``ModelProto`` is copied, so the caller's object is never modified; pass ``base_dir`` when its
    initializers refer to external data. Raises :class:`ModelLoadError` with a one-line reason, also
    for a lora-onnx manifest that is malformed or names nodes / tensors the graph lacks (unless
    ``check_manifest`` is False: comparing outputs does not need it).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        path, folder = None, Path(base_dir) if base_dir is not None else None
    else:
        path = Path(model)
        proto, folder = _read_graph(path), path.parent
    _name_unnamed_nodes(proto.graph)
    # The proto is checked before onnx-ir reads it (its own errors on hostile entries are not one line).
    unchecked = _Unchecked(proto, path, folder)
    _check_graph(unchecked)
    _check_external_data(unchecked)
    _refuse_unkept(unchecked)
    try:
        loaded = LoadedModel.from_proto(proto, path, folder)
    except Exception as exc:  # onnx-ir's own refusal of a graph it cannot represent, made one line
        raise ModelLoadError(f"{unchecked.name}: the graph cannot be read into onnx-ir ({exc})") from exc
    if check_manifest:
        try:
            check_branches(loaded.proto)
        except FoldError as exc:  # the graph lacks what the manifest records
            raise FoldError(f"{loaded.name}: {exc}") from exc
        except LoraOnnxError as exc:  # the manifest itself is malformed
            raise ModelLoadError(f"{loaded.name}: {exc}") from exc
    return loaded


@dataclass(frozen=True)
class _Unchecked:
    """What the load checks read of a model before its record is made."""

    proto: onnx.ModelProto
    path: Path | None
    base_dir: Path | None

    @property
    def name(self) -> str:
        return self.path.name if self.path else (self.proto.graph.name or "<in-memory model>")


def _read_graph(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an .onnx file")
    try:
        data = _read_bytes(path)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from exc
    proto = onnx.ModelProto()
    try:
        with progress.step(f"parsing {path.name}"):
            proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model, or the file is truncated ({exc})") from exc
    if not proto.graph.node or not proto.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model, or the file is truncated (the graph is empty)")
    _check_opsets(path, proto)
    return proto


_READ_CHUNK = 16 << 20


def _read_bytes(path: Path) -> bytearray:
    """The file's bytes, read in chunks so that reading a big graph reports progress."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        with progress.step(f"reading {path.name}", total=size, unit="bytes") as advance:
            while done < size:
                count = file.readinto(view[done : done + _READ_CHUNK])
                if not count:
                    break  # the file shrank while being read: parsing reports the truncation
                done += count
                advance(count)
        view.release()
    return data[:done] if done < size else data


def _check_opsets(path: Path, proto: onnx.ModelProto) -> None:
    """Protobuf parses a file cut at a top-level field boundary: a cut right after the graph loses
    opset_import (which follows it) yet parses cleanly, so a complete-looking graph needs its opsets."""
    if not proto.opset_import:
        raise ModelLoadError(
            f"{path}: the model imports no opset (opset_import is empty); the file is truncated or not a "
            "complete ONNX model"
        )
    imported = {entry.domain or "ai.onnx" for entry in proto.opset_import}
    for index, node in enumerate(proto.graph.node):
        if (node.domain or "ai.onnx") not in imported:
            raise ModelLoadError(
                f"{path}: node {node.name or f'#{index}'!r} ({node.op_type}) is in domain {node.domain!r}, "
                f"which the model does not import ({', '.join(sorted(imported))}); the file may be truncated"
            )


def _name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: sites, reports and branch records refer to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{index}"
            name, suffix = base, 0
            while name in seen:
                suffix += 1
                name = f"{base}_{suffix}"
            node.name = name
        seen.add(node.name)


def _check_graph(model: _Unchecked) -> None:
    """Every node input must be defined before use: catches truncation and unsorted graphs early."""
    graph = model.proto.graph
    defined = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    defined |= {sparse.values.name for sparse in graph.sparse_initializer}  # named by its values
    defined.add("")
    for node in graph.node:
        for name in node.input:
            if name not in defined:
                raise ModelLoadError(
                    f"{model.name}: node {node.name!r} ({node.op_type}) uses {name!r}, which no earlier "
                    "node, input or initializer defines (the file may be truncated or the graph unsorted)"
                )
        defined.update(node.output)
    for output in graph.output:
        if output.name not in defined:
            raise ModelLoadError(f"{model.name}: graph output {output.name!r} is never computed")


def _check_external_data(model: _Unchecked) -> None:
    """Every external tensor's entries, file and byte range, as onnxruntime will need them.

    One line names the tensor and the file: a location that is not a regular file inside the model's
    folder (a folder, a symbolic link leading out, ``..``), malformed entries, a ``length`` other than
    the tensor's size (dims x dtype), or a file too short for ``offset`` + size with or without ``length``.
    """
    _refuse_unsupported_external(model)
    # every tensor, not external_refs() (keyed by name: a second tensor of one name must not slip by)
    external: list[tuple[onnx.TensorProto, ExternalRef]] = []
    for tensor in all_tensors(model.proto.graph):
        try:
            ref = external_ref(tensor)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{model.name}: {exc}") from exc
        if ref is not None:
            external.append((tensor, ref))
    if not external:
        return
    if model.base_dir is None:
        raise ModelLoadError(
            f"{model.name}: initializer {external[0][0].name!r} is stored as external data; load the model "
            "from its file or pass base_dir="
        )
    sizes: dict[Path, int] = {}
    resolved: dict[str, Path] = {}  # one resolve per file, not per tensor (LLMs: thousands share one)
    for tensor, ref in external:
        what = f"initializer {tensor.name!r}"
        file = model.base_dir / ref.location
        if ref.location not in resolved:
            try:
                resolved[ref.location] = data_file(model.base_dir, ref.location, what, model.path)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{model.name}: {exc}") from exc
        target = resolved[ref.location]
        size = _stored_size(model, tensor, f"{what} (in {file})")
        if ref.length is not None and ref.length != size:
            raise ModelLoadError(
                f"{model.name}: {what} declares external_data length {ref.length} in {file}, but its "
                f"shape {list(shape_of(tensor))} of {type_name(tensor.data_type)} takes {size} bytes"
            )
        if target not in sizes:
            sizes[target] = target.stat().st_size
        if ref.offset + size > sizes[target]:
            raise ModelLoadError(
                f"{model.name}: external data file {file} is truncated: {what} needs bytes "
                f"{ref.offset}..{ref.offset + size} but the file has {sizes[target]}"
            )


def _refuse_unkept(model: _Unchecked) -> None:
    """What onnx-ir, the graph layer, does not hold: a rewrite would drop it (sparse initializers,
    training_info) or fail (sparse attributes)."""
    if model.proto.training_info:
        raise ModelLoadError(
            f"{model.name}: the model carries training_info (an ONNX training algorithm), which lora-onnx's "
            "graph layer (onnx-ir) does not keep; rewrite the inference model before adding training"
        )
    graph = model.proto.graph
    if graph.sparse_initializer:
        name = graph.sparse_initializer[0].values.name
        raise ModelLoadError(
            f"{model.name}: sparse initializer {name!r}: lora-onnx's graph layer (onnx-ir) does not keep "
            "sparse tensors; store it as a dense initializer first (its values scattered at its indices)"
        )
    functions = [node for function in model.proto.functions for node in function.node]
    for node in (*_all_nodes(graph), *functions):
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                raise ModelLoadError(
                    f"{model.name}: node {node.name!r} ({node.op_type}) has the sparse tensor attribute "
                    f"{attr.name!r}, which lora-onnx's graph layer (onnx-ir) does not hold; use a dense "
                    "Constant value instead"
                )


def _stored_size(model: _Unchecked, tensor: onnx.TensorProto, what: str) -> int:
    """The bytes an external tensor's values take; refuses types without a fixed size, negative dims."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or (
        tensor.data_type not in onnx.TensorProto.DataType.values()
    ):
        raise ModelLoadError(
            f"{model.name}: {what} is stored as external data with element type {tensor.data_type} "
            f"({_type_label(tensor.data_type)}), which has no fixed byte size (onnx keeps such tensors "
            "inline)"
        )
    if any(dim < 0 for dim in tensor.dims):
        raise ModelLoadError(f"{model.name}: {what} has a negative dimension {list(tensor.dims)}")
    return nbytes(tensor)


def _type_label(data_type: int) -> str:
    return type_name(data_type) if data_type in onnx.TensorProto.DataType.values() else "unknown"


def _refuse_unsupported_external(model: _Unchecked) -> None:
    """External data lora-onnx would neither check nor carry along: sparse tensors, function constants."""
    graph = model.proto.graph
    places: list[tuple[str, onnx.TensorProto]] = []
    for sparse in graph.sparse_initializer:
        places += [("sparse initializer", sparse.values), ("sparse initializer", sparse.indices)]
    for node in _all_nodes(graph):
        for attr in node.attribute:
            for sparse in (attr.sparse_tensor, *attr.sparse_tensors):
                places += [(f"node {node.name!r}", sparse.values), (f"node {node.name!r}", sparse.indices)]
    for function in model.proto.functions:
        for node in function.node:
            for attr in node.attribute:
                places += [(f"function {function.name!r}", t) for t in (attr.t, *attr.tensors)]
    for where, tensor in places:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelLoadError(
                f"{model.name}: {where} stores tensor {tensor.name!r} as external data, which lora-onnx "
                "does not support there; save the model with that tensor inline"
            )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                yield from _all_nodes(sub)
