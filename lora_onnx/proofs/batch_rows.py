"""Batch rows: which axis of each graph input and output is the batch, and which sites keep rows apart.

A mixed-batch branch (:mod:`lora_onnx.stages.stacked`) gives every batch row its own adapter, so it must know,
at each site, which part of the data input belongs to which row. It assumes *batch-major* rows: viewed
as ``[B, -1, in]`` (dense) or ``[B, C, ...]`` (conv), block ``i`` holds row ``i`` only. That covers
``[B, S, in]`` MatMul inputs and the ``[B*S, in]`` inputs of 2-D Gemms between Reshapes, but not a site
whose input lost or moved the batch dim (a sequence-first layout, a batch-independent constant path).

Graph structure alone cannot show that in general, so :func:`probe_sites` checks it in onnxruntime:
the base model runs on a 3-row batch, on its first 2 rows, and on the 3 rows with rows 0 and 2 replaced;
a site passes when its input has the same number of rows per batch row at batch 3 and 2, blocks 0 and 1
agree between the 3- and 2-row runs (they do not see row 2), and block 1 is unchanged when rows 0 and 2
change. Sites that fail are skipped with the reason.

A fixed batch size B (a dynamo export without ``dynamic_shapes``) cannot be run at 3 and 2 rows: the
probe then runs B rows, the same B rows with every row but row 0 replaced, and with row 0 replaced; a site
passes when its input splits into B blocks, block 0 is unchanged in the second run and every other
block in the third, and block 0 does change in the third (else its rows cannot be told apart).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from lora_onnx.errors import LoraOnnxError, TargetError
from lora_onnx.kinds import kind_of
from lora_onnx.model.graph import values_by_name
from lora_onnx.model.load import LoadedModel
from lora_onnx.proofs.inputs import make_inputs
from lora_onnx.proofs.validation import (
    InputsLike,
    create_session,
    given_inputs,
    input_specs,
    parse_providers,
    run_model,
    session_source,
)
from lora_onnx.sites.find import Site, Skipped
from lora_onnx.stages.stacked import BatchAxes  # the record the stacked form is built for

#: Batch sizes of the probe runs (3 rows, and its first 2).
PROBE_ROWS = 3
#: Two runs' blocks agree when max|a - b| <= PROBE_RTOL * max|a| + PROBE_ATOL (different batch sizes
#: may take different kernel paths; a row that leaks into another changes it by far more).
PROBE_RTOL, PROBE_ATOL = 1e-4, 1e-6


@dataclass(frozen=True)
class Probe:
    """The probe's verdict: sites whose input keeps batch rows apart, the others (with the reason), and
    ``batched``, the dense sites whose input already is ``[B, k, in]`` (no reshape needed to split rows)."""

    kept: tuple[Site, ...]
    skipped: tuple[Skipped, ...]
    batched: frozenset[str] = frozenset()


def _dims(value: ir.Value) -> list[int | str | None]:
    """The declared dims of a graph input or output: sizes, symbolic names, None for unnamed ones."""
    if value.shape is None:
        return []
    return [dim if isinstance(dim, int) else dim.value for dim in value.shape]


def batch_axes(model: LoadedModel, *, exclude: Collection[str] = ()) -> BatchAxes:
    """The model's batch dim: the symbolic dim most graph inputs have first (inputs backed by
    initializers and ``exclude`` left out); each input's and output's batch axis is where it has that dim.
    Without one, the fixed size most inputs have first: their axis 0 (outputs: where they start with it)."""
    graph = model.ir_model.graph
    initializers = graph.initializers
    inputs = [v for v in graph.inputs if v.name not in initializers and v.name not in exclude]
    firsts = Counter(dims[0] for v in inputs if (dims := _dims(v)) and isinstance(dims[0], str) and dims[0])
    if not firsts:
        fixed = Counter(d[0] for v in inputs if (d := _dims(v)) and isinstance(d[0], int) and d[0] >= 1)
        if fixed:
            size = fixed.most_common(1)[0][0]
            in_fixed = {v.name: 0 for v in inputs if (d := _dims(v)) and d[0] == size}
            out_fixed = {v.name: 0 if (d := _dims(v)) and d[0] == size else None for v in graph.outputs}
            return BatchAxes("", in_fixed, out_fixed, size)
        shapes = ", ".join(f"{v.name} {_dims(v)}" for v in inputs[:3]) or "no inputs"
        raise TargetError(
            f"{model.name}: mixed batches need a symbolic batch dim or a fixed one as the first dim of the "
            f"graph inputs (the index input has one entry per batch row), but the inputs are {shapes}"
        )
    name = firsts.most_common(1)[0][0]
    in_axes = {v.name: _dims(v).index(name) for v in inputs if name in _dims(v)}
    out_axes = {v.name: _dims(v).index(name) if name in _dims(v) else None for v in graph.outputs}
    return BatchAxes(name, in_axes, out_axes)


def take_rows(
    feeds: Mapping[str, np.ndarray], axes: BatchAxes, rows: slice | Sequence[int]
) -> dict[str, np.ndarray]:
    """``feeds`` restricted to batch ``rows`` (inputs without a batch axis unchanged)."""
    taken = {}
    for name, value in feeds.items():
        axis = axes.inputs.get(name)
        if axis is None:
            taken[name] = value
        else:
            index = [slice(None)] * value.ndim
            index[axis] = rows if isinstance(rows, slice) else list(rows)
            taken[name] = np.ascontiguousarray(value[tuple(index)])
    return taken


def _replace_rows(
    feeds: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], axes: BatchAxes, rows: Sequence[int]
) -> dict[str, np.ndarray]:
    changed = dict(feeds)
    for name, axis in axes.inputs.items():
        if name not in feeds:
            continue
        value = np.array(feeds[name])
        index = [slice(None)] * value.ndim
        index[axis] = list(rows)
        value[tuple(index)] = other[name][tuple(index)]
        changed[name] = value
    return changed


def feeds_for(
    session_specs: Sequence[object],
    axes: BatchAxes,
    rows: int,
    dims: Mapping[str, int] | None,
    seed: int = 0,
    graph: onnx.GraphProto | None = None,
    given: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Generated inputs (:func:`lora_onnx.proofs.inputs.make_inputs`, reading ``graph`` for decoder inputs)
    with ``rows`` batch rows; with ``given`` (the user's ``--inputs``), its rows instead, cycled from row
    ``seed`` on (see :func:`given_rows`)."""
    if axes.size is not None and rows != axes.size:
        raise LoraOnnxError(f"the model's batch size is fixed at {axes.size}; a run cannot have {rows} rows")
    if given is not None:
        return given_rows(given, axes, rows, seed)
    sizes = {**(dims or {}), **({axes.name: rows} if axes.size is None else {})}
    return make_inputs(session_specs, sizes, seed, strict=True, graph=graph)


def given_rows(
    given: Mapping[str, np.ndarray], axes: BatchAxes, rows: int, start: int = 0, negate: bool = False
) -> dict[str, np.ndarray]:
    """``rows`` batch rows of the user's inputs, cycled from row ``start``; ``negate`` flips the sign of
    the float inputs with a batch axis (the probe's replacement rows must differ from its first rows even
    when the file holds one row)."""
    anchor = given.get(axes.anchor)
    if (
        anchor is None
        or anchor.ndim <= axes.inputs[axes.anchor]
        or anchor.shape[axes.inputs[axes.anchor]] < 1
    ):
        raise LoraOnnxError(f"--inputs has no batch rows in {axes.anchor!r} to build a mixed batch from")
    count = anchor.shape[axes.inputs[axes.anchor]]
    feeds = take_rows(given, axes, [(start + i) % count for i in range(rows)])
    if negate:
        for name, value in feeds.items():
            if name in axes.inputs and np.issubdtype(value.dtype, np.floating):
                feeds[name] = -value
    return feeds


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - b64))
    finite = np.abs(a64[np.isfinite(a64)])
    scale = float(finite.max()) if finite.size else 0.0
    return bool(np.all(diff <= PROBE_ATOL + PROBE_RTOL * scale))


def _blocks(site: Site, value: np.ndarray, rows: int) -> np.ndarray | str:
    """``value`` (the site's data input) as one block per batch row, or why it cannot be split so."""
    if site.gemm is not None and site.gemm.trans_a:
        value = value.T
    return kind_of(site.op).batch_rows(site, value, rows)


def probe_sites(
    model: LoadedModel,
    sites: Sequence[Site],
    axes: BatchAxes,
    *,
    dims: Mapping[str, int] | None = None,
    providers: str | Sequence[str] = ("cpu",),
    inputs: InputsLike = None,
) -> Probe:
    """Split ``sites`` into those whose data input is batch-major and those that are not (see the module
    doc); runs ``model`` three times in onnxruntime on its first provider, on generated inputs or the
    rows of ``inputs`` (an .npz path or arrays; see :func:`feeds_for`)."""
    if not sites:
        return Probe((), ())
    provider = parse_providers(providers)[0]
    with ExitStack() as stack:
        source = session_source(_probe_model(model, sites), stack, "probe.onnx")
        session = create_session(source, provider, f"{model.name} (batch-row probe)")
        specs = input_specs(session)
        given = given_inputs(inputs, specs)
        rows = PROBE_ROWS if axes.size is None else axes.size
        full = feeds_for(specs, axes, rows, dims, seed=0, graph=model.proto.graph, given=given)
        other = (
            feeds_for(specs, axes, rows, dims, seed=1, graph=model.proto.graph)
            if given is None
            else given_rows(given, axes, rows, 1, negate=True)
        )
        if axes.size is None:
            variants = (full, take_rows(full, axes, slice(0, 2)), _replace_rows(full, other, axes, (0, 2)))
        else:  # fixed batch: row 0 kept while the others change, then row 0 alone changed
            others = _replace_rows(full, other, axes, range(1, rows))
            variants = (full, others, _replace_rows(full, other, axes, (0,)))
        runs = []
        for feeds in variants:
            try:
                outputs = run_model(session, feeds, model.name)
            except LoraOnnxError as exc:
                raise LoraOnnxError(f"probing batch rows: {exc}") from exc
            runs.append({**{k: v for k, v in feeds.items()}, **outputs})
    kept: list[Site] = []
    skipped: list[Skipped] = []
    batched: set[str] = set()
    for site in sites:
        reason = _site_reason(site, runs) if axes.size is None else _fixed_reason(site, runs, axes.size)
        if reason is None:
            kept.append(site)
            # A tensor's rank is fixed by the graph, and the probe saw dim 0 follow the batch.
            shapes = [run[site.data_input].shape for run in runs[:2]]
            three_d = kind_of(site.op).batched_input(shapes)
            expected = (PROBE_ROWS, 2) if axes.size is None else (axes.size, axes.size)
            if three_d and (shapes[0][0], shapes[1][0]) == expected:
                batched.add(site.node)
        else:
            skipped.append(
                Skipped(site.node, site.op, site.module_path, f"input {site.data_input!r}: {reason}")
            )
    return Probe(tuple(kept), tuple(skipped), frozenset(batched))


def _probe_model(model: LoadedModel, sites: Sequence[Site]) -> LoadedModel:
    """``model`` with every site's data input (graph inputs aside) also a graph output, typed as the site
    and without a declared shape (the runs fix it)."""
    probe = model.to_ir()
    graph = probe.graph
    values = values_by_name(graph)
    graph_inputs = {v.name for v in graph.inputs}
    declared = {v.name for v in graph.outputs}
    watched = list(dict.fromkeys(s.data_input for s in sites if s.data_input not in graph_inputs))
    for name in watched:
        if name not in declared:
            elem = next(s.dtype for s in sites if s.data_input == name)
            value = values[name]
            value.type, value.shape = ir.TensorType(ir.DataType(elem)), None
            graph.outputs.append(value)
    return model.with_ir(probe)


def _site_reason(site: Site, runs: Sequence[Mapping[str, np.ndarray]]) -> str | None:
    three, two, changed = (run[site.data_input] for run in runs)
    blocks = [_blocks(site, value, rows) for value, rows in ((three, 3), (two, 2), (changed, 3))]
    for item in blocks:
        if isinstance(item, str):
            return f"{item}, so rows cannot be told apart"
    b3, b2, bc = blocks
    assert not isinstance(b3, str) and not isinstance(b2, str) and not isinstance(bc, str)
    if b3.shape[1:] != b2.shape[1:]:
        return (
            f"it does not grow with the batch ({list(three.shape)} at batch 3, {list(two.shape)} at "
            "batch 2), so it has no batch dim to split rows by"
        )
    if not (_close(b3[0], b2[0]) and _close(b3[1], b2[1]) and _close(b3[1], bc[1])):
        return (
            "its rows mix batch rows (a row's block changes when another row changes): the batch is not "
            "its leading dim"
        )
    return None


def _fixed_reason(site: Site, runs: Sequence[Mapping[str, np.ndarray]], rows: int) -> str | None:
    """:func:`_site_reason` for a fixed batch of ``rows`` (see the module doc)."""
    values = [run[site.data_input] for run in runs]
    blocks = [_blocks(site, value, rows) for value in values]
    for item in blocks:
        if isinstance(item, str):
            return f"{item}, so rows cannot be told apart"
    full, others, first = blocks
    assert not isinstance(full, str) and not isinstance(others, str) and not isinstance(first, str)
    if not _close(full[0], others[0]) or not all(_close(full[i], first[i]) for i in range(1, rows)):
        return (
            "its rows mix batch rows (a row's block changes when another row changes): the batch is not "
            "its leading dim"
        )
    if _close(full[0], first[0]):
        return "it does not change when its batch row does, so it has no batch rows to tell apart"
    return None
