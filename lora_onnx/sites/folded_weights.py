"""Sites whose weight the exporter folded another op into, and how a PEFT branch must change for them.

Exporters fold a BatchNorm that follows a Conv (or Gemm) into its weight and bias: the graph holds
``W' = f * W`` per output channel, ``f = gamma / sqrt(var + eps)``. PEFT's branch runs inside the module,
before the BatchNorm, so its output is ``BN(W x + d x) = f * (W x + d x) + ...``; a branch added after the
fused node misses ``f`` (REFERENCE section 7). What the graph shows of such a fold:

- onnxscript's optimizer (dynamo export, ``optimize=True``) keeps the weight's name and writes the rule
  into the node's ``pkg.onnxscript.rewriter.rule_name`` metadata (:data:`FOLD_RULES`);
- the TorchScript exporter's constant folding names the folded weight after its consumer,
  ``onnx::Conv_403``. A plain Conv or a 2-D Linear (Gemm) keeps its parameter's name there, so an
  anonymous Conv / Gemm weight was computed at export. A pre-transposed Linear weight is named
  ``onnx::MatMul_733`` too, and is just ``W^T``: MatMul names are no evidence.

:func:`find_folded` reports those sites (``inspect`` lists them, PEFT planning refuses them). Given the
base model's original parameters (:class:`BaseWeights`, ``--base-weights FILE.safetensors``),
:func:`compare_site` decides per site instead: the graph's weight equals the module's parameter (a plain
site), or equals it up to a per-output-channel factor ``f`` (the branch's B rows, lora_B bias and
merged delta are scaled by ``f``: exact), or is something else (refused, naming the site).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from safetensors import SafetensorError, safe_open

from lora_onnx.errors import AdapterError
from lora_onnx.kinds import kind_of
from lora_onnx.model.graph import nodes_by_name
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import ModelMetadata, metadata_entries, replace_metadata
from lora_onnx.model.module_paths import REWRITE_RULE_KEY
from lora_onnx.model.tensors import np_dtype
from lora_onnx.sites.find import SITE_OPS, Site

#: onnxscript rewrite rules that fold an op into the node's weight: rule -> (what, per-output-channel).
#: The default optimizer applies the BatchNorm rules; the affine ones are opt-in. A per-output factor
#: (``W' = f * W`` per output channel) is recoverable from the original weights; AffineConvFusion folds a
#: preceding ``x * scale + offset`` (its offset moves into the bias), which no branch scaling reproduces.
FOLD_RULES: dict[str, tuple[str, bool]] = {
    "FuseBatchNormIntoConv": ("BatchNorm", True),
    "FuseBatchNormIntoGemm": ("BatchNorm", True),
    "FuseBatchNormIntoConvTranspose": ("BatchNorm", True),
    "ConvAffineFusion": ("a following Mul and Add by constants", True),
    "AffineConvFusion": ("a preceding Mul and Add by constants", False),
}
#: How to export without the fold, per exporter.
REEXPORT = {
    "dynamo": "torch.onnx.export(..., dynamo=True, optimize=False)",
    "torchscript": "torch.onnx.export(..., dynamo=False, do_constant_folding=False)",
}
BASE_WEIGHTS_HINT = (
    "--base-weights FILE.safetensors, the base model's original parameters "
    "(safetensors.torch.save_file(model.state_dict(), FILE))"
)


class FoldedWeightError(AdapterError):
    """A PEFT branch would sit on a weight the exporter folded another op into."""


@dataclass(frozen=True)
class FoldedWeight:
    """A site whose weight was folded by the exporter: what was folded in, and the evidence for it.

    ``output_side``: the fold scales each output channel (a BatchNorm after the module), which the base
    weights recover; otherwise (an op before the module, or unknown) no branch scaling is exact.
    """

    site: str
    op: str
    module_path: str
    weight: str
    folded: str
    evidence: str
    exporter: str
    output_side: bool = True

    @property
    def reason(self) -> str:
        return f"weight was folded by the exporter ({self.folded})"

    @property
    def note(self) -> str:
        """One line for ``inspect`` and warnings."""
        return (
            f"{self.op} node {self.site!r} ({self.module_path}): {self.reason}; {self.evidence}. A PEFT "
            f"adapter on it needs a re-export keeping that op ({REEXPORT[self.exporter]})"
            + (f" or {BASE_WEIGHTS_HINT}" if self.output_side else "")
        )


def folded_weight(nodes: Mapping[str, ir.Node], site: Site) -> FoldedWeight | None:
    """The fold the graph shows for ``site``'s weight (``nodes``: the graph's nodes by name), or None when
    it shows none."""
    metadata = nodes[site.node].metadata_props
    rules = [rule.strip() for rule in metadata.get(REWRITE_RULE_KEY, "").split(",")]
    found = [rule for rule in rules if rule in FOLD_RULES]
    weight = site.weight.initializer
    if found:
        # An input-side rule wins: then no scaling of the branch is exact.
        rule = min(found, key=lambda r: FOLD_RULES[r][1])
        what, output_side = FOLD_RULES[rule]
        evidence = f"onnxscript rule {rule} in the node's metadata ({REWRITE_RULE_KEY})"
        return FoldedWeight(
            site.node, site.op, site.module_path, weight, what, evidence, "dynamo", output_side
        )
    what = kind_of(site.op).torchscript_fold
    if what and weight.startswith(f"onnx::{site.op}_"):
        evidence = (
            f"TorchScript constant folding computed it at export (an anonymous {weight!r}, where a plain "
            f"{site.op} keeps its parameter's name)"
        )
        return FoldedWeight(site.node, site.op, site.module_path, weight, what, evidence, "torchscript")
    return None


def find_folded(model: LoadedModel, sites: Iterable[Site]) -> tuple[FoldedWeight, ...]:
    """Every site of ``sites`` whose weight the graph shows as folded by the exporter."""
    nodes = nodes_by_name(model.ir_model.graph)
    found = (folded_weight(nodes, site) for site in sites)
    return tuple(fold for fold in found if fold is not None)


def refuse_folded(folds: Sequence[FoldedWeight], source: str) -> None:
    """Raise :class:`FoldedWeightError` for the first of ``folds`` (a PEFT adapter without base weights)."""
    if not folds:
        return
    fold = folds[0]
    more = f" (and {len(folds) - 1} more site(s))" if len(folds) > 1 else ""
    raise FoldedWeightError(
        f"{source}: module {fold.module_path!r} is {fold.op} node {fold.site!r}, whose {fold.reason}: "
        f"{fold.evidence}{more}. PEFT's branch runs before the folded op, so a branch after the fused node "
        f"would be wrong; re-export keeping it ({REEXPORT[fold.exporter]})"
        + (f" or give {BASE_WEIGHTS_HINT}" if fold.output_side else "")
    )


class BaseWeights:
    """The base model's original parameters in a safetensors file, read lazily (header, then per tensor)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AdapterError(f"--base-weights {self.path}: no such file")
        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                self.keys: frozenset[str] = frozenset(handle.keys())
        except OSError as exc:
            raise AdapterError(f"--base-weights {self.path}: cannot read ({exc.strerror or exc})") from exc
        except SafetensorError as exc:
            raise AdapterError(
                f"--base-weights {self.path}: not a safetensors file, or truncated ({exc})"
            ) from exc

    def key_for(self, paths: Sequence[str]) -> str:
        """The key of the weight of the module named by one of ``paths`` (graph path, adapter path).

        Tried in order: ``<path>.weight``, PEFT-wrapped names (``base_model.model.``, ``.base_layer``),
        then a single key ending in ``.<path>.weight`` (the file's model wraps the export's).
        """
        wanted = [
            f"{prefix}{path}{suffix}"
            for path in paths
            for prefix in ("", "base_model.model.")
            for suffix in (".weight", ".base_layer.weight")
        ]
        for key in wanted:
            if key in self.keys:
                return key
        for path in paths:
            longer = sorted(key for key in self.keys if key.endswith(f".{path}.weight"))
            if len(longer) == 1:
                return longer[0]
        raise AdapterError(
            f"--base-weights {self.path} has no tensor {wanted[0]!r} (the original weight of module "
            f"{paths[0]!r}); save the state dict of the model that was exported"
        )

    def read(self, key: str) -> np.ndarray:
        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                return np.asarray(handle.get_tensor(key))
        except (OSError, SafetensorError, TypeError) as exc:
            raise AdapterError(f"--base-weights {self.path}: cannot read tensor {key!r} ({exc})") from exc


@dataclass(frozen=True)
class SiteScaling:
    """How a site's graph weight relates to its module's original parameter ``key``.

    ``factor`` is None when they are equal, else the per-output-channel ``f`` with ``graph = f * original``.
    ``original`` is the parameter in the site's source-initializer layout (DoRA's norm is computed on it).
    """

    site: str
    key: str
    original: np.ndarray
    factor: np.ndarray | None = None


def _eps(*dtypes: np.dtype) -> float:
    worst = 0.0
    for dtype in dtypes:
        try:
            worst = max(worst, float(np.finfo(dtype).eps))
        except (TypeError, ValueError):
            worst = max(worst, 2.0**-7)  # bfloat16 and other ml_dtypes floats: the coarsest in use
    return worst


def _node_weight(model: LoadedModel, site: Site) -> np.ndarray:
    """The weight as the node uses it, channels first: (out, in) for dense, (out, in/g, k...) for Conv."""
    source = np.asarray(model.array(site.weight.initializer), np.float64)
    node = source.T if site.weight.transposed else source
    return node.T if site.layout == "in,out" else node


def _per_channel(graph: np.ndarray, original: np.ndarray, tol: float) -> np.ndarray | str | None:
    """``f`` with ``graph == f * original`` per row (output channels); None when f == 1, else why not."""
    rows_g = graph.reshape(graph.shape[0], -1)
    rows_w = original.reshape(original.shape[0], -1)
    scale = np.maximum(np.abs(rows_g).max(axis=1), np.abs(rows_w).max(axis=1))
    limit = tol * scale + 1e-30
    if np.all(np.abs(rows_g - rows_w).max(axis=1) <= limit):
        return None
    power = np.sum(rows_w * rows_w, axis=1)
    zero = power == 0
    if np.any(zero):
        channel = int(np.flatnonzero(zero)[0])
        return (
            f"output channel {channel} of the original weight is all zero, so its factor cannot be recovered"
        )
    factor = np.sum(rows_g * rows_w, axis=1) / power
    deviation = np.abs(rows_g - factor[:, None] * rows_w).max(axis=1)
    if np.all(deviation <= tol * np.abs(rows_g).max(axis=1) + 1e-30):
        return factor
    return "it is neither that parameter nor the parameter scaled per output channel"


def compare_site(model: LoadedModel, site: Site, base: BaseWeights, paths: Sequence[str]) -> SiteScaling:
    """Compare ``site``'s graph weight with its module's original parameter (see the module doc).

    Raises :class:`FoldedWeightError` naming the site when the graph's weight is neither the parameter
    nor the parameter scaled per output channel.
    """
    key = base.key_for(paths)
    original = base.read(key)
    where = f"{site.op} node {site.node!r} ({site.module_path}): weight {site.weight.initializer!r}"
    if site.weight.dequantize is not None:
        raise FoldedWeightError(
            f"{where} is quantized, so it cannot be compared with --base-weights {key!r}; apply the adapter "
            "to a float export"
        )
    graph = _node_weight(model, site)
    candidates = [original]
    if original.ndim == 2 and original.shape[::-1] == graph.shape:
        # (in, out) parameters (transformers' Conv1D); a square weight may be either way round.
        candidates = [original, original.T] if original.shape == graph.shape else [original.T]
    elif original.shape != graph.shape:
        raise FoldedWeightError(
            f"{where} has shape {list(graph.shape)} (channels first), but --base-weights {key!r} has "
            f"{list(original.shape)}: not that module's parameter"
        )
    tol = 16 * _eps(np_dtype(site.weight.source_dtype), original.dtype)
    why = ""
    for candidate in candidates:
        wide = np.asarray(candidate, np.float64)
        if candidate.shape != graph.shape:
            continue
        found = _per_channel(graph, wide, tol)
        if isinstance(found, str):
            why = why or found
            continue
        if found is not None and kind_of(site.op).exact_parameter:
            why = "an embedding table must equal its parameter"
            continue
        layout = np.asarray(wide, np.float32)
        if kind_of(site.op).torch_transposed(site):
            layout = layout.T
        return SiteScaling(site.node, key, np.ascontiguousarray(layout), found)
    raise FoldedWeightError(f"{where} is not --base-weights {key!r} as exported: {why}")


#: Model metadata (+ adapter name): JSON list of the nodes whose branch carries a fold factor in B.
SCALED_KEY = "lora_onnx.folded_factor."


def mark_scaled(model: ModelMetadata, adapter: str, nodes: Iterable[str]) -> None:
    """Record that the branches of ``adapter`` at ``nodes`` carry the fold factor (B = f * PEFT's B)."""
    listed = sorted(set(nodes) | scaled_nodes(model, adapter))
    if not listed:
        return
    key = SCALED_KEY + adapter
    replace_metadata(model, lambda name: name != key, key, json.dumps(listed))


def scaled_nodes(model: ModelMetadata, adapter: str) -> frozenset[str]:
    """The nodes :func:`mark_scaled` recorded for ``adapter``."""
    for key, text in metadata_entries(model):
        if key == SCALED_KEY + adapter:
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            if not isinstance(value, list):
                raise AdapterError(f"the model's {key} metadata is not a list of node names")
            return frozenset(str(node) for node in value)
    return frozenset()


def refuse_peft_export(model: LoadedModel, adapter: str, nodes: Iterable[str]) -> None:
    """Refuse to write branches at ``nodes`` as a PEFT adapter when their site's weight is folded.

    In PyTorch the module runs before the folded BatchNorm, so a branch after the fused node (made here,
    or applied with ``--base-weights``, whose B carries the factor) is not that module's PEFT adapter.
    """
    from lora_onnx.sites.find import scan_sites

    wanted = set(nodes)
    scaled = scaled_nodes(model.ir_model, adapter) & wanted
    sites = [site for site in scan_sites(model, tuple(SITE_OPS)).sites if site.node in wanted]
    folds = find_folded(model, sites)
    if not folds and not scaled:
        return
    if folds:
        fold = folds[0]
        what = f"{fold.op} node {fold.site!r} ({fold.module_path}), whose {fold.reason}: {fold.evidence}"
        fix = f"export the adapter from a model that keeps the BatchNorm ({REEXPORT[fold.exporter]})"
    else:
        what = f"node {sorted(scaled)[0]!r}, whose B carries the folded BatchNorm's factor (--base-weights)"
        fix = "export the PEFT adapter you applied instead"
    raise FoldedWeightError(
        f"{model.name}: adapter {adapter!r} has a branch at {what}; in PyTorch that module runs before the "
        f"folded op, so the branch is not its PEFT adapter: {fix}"
    )
