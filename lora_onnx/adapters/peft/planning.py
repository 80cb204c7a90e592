"""Plan a PEFT adapter's branches: keys -> sites, PEFT layouts -> lora-onnx layouts, shapes checked.

Everything that can be wrong with an adapter is found here, before the graph is touched: unreadable or
unsupported configs, keys that match no site, shapes that disagree with the site, config flags that
disagree with the keys. The result, a :class:`PeftPlan`, carries every tensor the rewrite adds.

Layouts (PEFT -> stored):

- Linear and GPT-2 Conv1D (MatMul or Gemm, whatever the weight's storage): ``lora_A`` (r, in) -> A (in, r),
  ``lora_B`` (out, r) -> B (r, out). In and out come from the ONNX node, never from ``fan_in_fan_out``.
- Conv: stored as PEFT has them, A (r, in, k...) dense (group 1) and B (out, r/g, 1...) with the base's
  group g. The conv A copies the base's dilation, where PEFT's does not (peft issue 3697): PEFT's forward
  is then wrong or fails on dilated convs, and ours equals PEFT's merged model.
- Embedding (Gather): ``lora_embedding_A`` (r, vocab) -> A (vocab, r), ``lora_embedding_B`` (dim, r) ->
  B (r, dim).
- ``lora_magnitude_vector`` and ``lora_B.bias`` are kept in PEFT's shape; DoRA's weight norm has the
  magnitude's shape.

Sites whose weight the exporter folded a BatchNorm into (:mod:`lora_onnx.sites.folded_weights`) are refused,
unless the base's original weights are given (``base_weights``): then every adapted site's weight is
compared with its module's parameter, and where the graph holds ``f * W`` per output channel, B's rows
and ``lora_B.bias`` are scaled by ``f`` (PEFT's ``f * (W x + d x)``, exactly; DoRA's norm uses ``W``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from lora_onnx.adapters.formats.source import (
    FileAdapterConfig,
    PeftRef,
    RemappedWeights,
    file_keys_in_errors,
    open_adapter,
)
from lora_onnx.adapters.peft.config import PeftAdapterConfig
from lora_onnx.adapters.peft.dora import weight_norm
from lora_onnx.adapters.peft.fused_attention import FusedDelta, split_fused
from lora_onnx.adapters.peft.mapping import (
    AdapterModule,
    ModuleMatch,
    match_modules,
    parse_keys,
    unmatched_modules,
)
from lora_onnx.adapters.peft.modules_to_save import SavedTensor, plan_saved_modules
from lora_onnx.adapters.peft.packed import (
    PackedGroup,
    block_branch,
    parse_module_map,
    refuse_extras,
    split_packed,
)
from lora_onnx.adapters.peft.tensors import SafetensorsFile
from lora_onnx.errors import AdapterError
from lora_onnx.kinds import all_kinds, kind_of
from lora_onnx.model.graph import FreshNames, nodes_by_name
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.tensors import np_dtype
from lora_onnx.recipes.config import DEFAULT_ADAPTER
from lora_onnx.recipes.plan import BranchPlan, Plan, tensor_stem, unique_stem
from lora_onnx.sites.find import Site, SiteScan, scan_sites
from lora_onnx.sites.folded_weights import BaseWeights, SiteScaling, compare_site, find_folded, refuse_folded

#: Op keys of the kinds a PEFT adapter can sit on (each kind's ``peft_role``): --ops plus embedding lookups.
PEFT_OPS = frozenset(kind.key for kind in all_kinds() if kind.peft_role)


@dataclass(frozen=True)
class PeftBranchExtras:
    """What one site's branch adds beyond A and B; every name is a key of :attr:`PeftPlan.values`
    ("" when absent). ``base_bias`` is the graph value the base node adds as its bias ("" if none),
    which a DoRA branch needs to rescale the output without it."""

    adapter_path: str
    magnitude: str = ""
    weight_norm: str = ""
    lora_bias: str = ""
    base_bias: str = ""


@dataclass(frozen=True)
class PeftPlan:
    """A PEFT adapter planned onto a model.

    ``plan`` holds one :class:`BranchPlan` per site (a module run twice has two, sharing tensors).
    ``values`` maps every tensor name the rewrite adds to its array, in lora-onnx storage layouts (see the
    module doc) and the site's dtype: A and B of every branch, plus DoRA magnitudes and weight norms and
    ``lora_B.bias`` vectors. ``extras`` maps each site's node name to its :class:`PeftBranchExtras`.
    """

    plan: Plan
    values: Mapping[str, np.ndarray]
    extras: Mapping[str, PeftBranchExtras] = field(default_factory=dict)
    config: PeftAdapterConfig | None = None
    folder: Path | None = None
    #: Nodes whose B (and lora_B bias) carry a folded BatchNorm's per-channel factor (``base_weights``).
    scaled: tuple[str, ...] = ()
    #: Modules folded into fused Attention nodes' packed weights (only with ``fused_merge``).
    fused: tuple[FusedDelta, ...] = ()
    #: Base tensors the adapter's ``modules_to_save`` replace
    #: (:mod:`lora_onnx.adapters.peft.modules_to_save`), and the file their values are read from.
    saved: tuple[SavedTensor, ...] = ()
    saved_weights: SafetensorsFile | None = None
    #: Adapter keys left out because their module matches no graph module (``skip_unmatched``).
    skipped_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))

    @property
    def branches(self) -> tuple[BranchPlan, ...]:
        return self.plan.branches


def adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter folder of ``path`` (a folder, or a file inside one such as adapter_config.json)."""
    folder = Path(path)
    return folder.parent if folder.is_file() else folder


def plan_peft_adapter(
    model: ModelLike,
    adapter_dir: str | os.PathLike,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    base_weights: str | os.PathLike | None = None,
    component: str | None = None,
    strength: float = 1.0,
    fused_merge: bool = False,
    modules_to_save: bool = False,
    skip_unmatched: bool = False,
    modules: Sequence[AdapterModule] | None = None,
    module_map: Sequence[str] = (),
) -> PeftPlan:
    """Map the PEFT adapter in ``adapter_dir`` onto ``model``'s sites (see the module doc).

    ``adapter_dir`` may also be a single-file LoRA (``.safetensors``: diffusers or kohya, see
    :mod:`lora_onnx.adapters.formats`); ``component`` picks its part for this model (``unet``,
    ``text_encoder``...; by default the one whose modules match the graph). ``strength`` multiplies
    every module's scale. ``modules_to_save``: plan the adapter's saved whole modules as replacements of
    the base's tensors (:attr:`PeftPlan.saved`); without it such keys are refused (run-time slots and
    mixed batches have no form for them). ``fused_merge``: modules inside fused Attention nodes fold into
    their packed weights (:mod:`lora_onnx.adapters.peft.fused_attention`); else they are refused.
    ``skip_unmatched``: keys of modules the graph does not have at all (pruned by the export) are left
    out, listed in :attr:`PeftPlan.skipped_keys` and a warning, instead of refused. ``modules``: plan only
    these adapter modules (parsed from the adapter by :func:`~lora_onnx.adapters.peft.mapping.parse_keys`;
    a folder run gives each model file the modules it carries) instead of every key of the adapter.
    ``module_map`` (``REGEX=REPL`` items) renames adapter module paths the graph does not have, before the
    builder's own renames and packed projections (:mod:`lora_onnx.adapters.peft.packed`).

    Reads adapter_config.json and adapter_model.safetensors, and weight bytes only for DoRA norms and,
    with ``base_weights`` (the base model's state dict as safetensors), the adapted sites' weights.
    Raises :class:`~lora_onnx.errors.AdapterError` naming the key, module or node for anything that
    does not fit, including a site whose weight the exporter folded a BatchNorm into (without
    ``base_weights``). Modules onnxruntime's optimizer fused into an Attention node are refused, or,
    with ``fused_merge``, returned as :attr:`PeftPlan.fused` (:mod:`lora_onnx.adapters.peft.fused_attention`).
    """
    if isinstance(adapter_dir, PeftRef):
        component = adapter_dir.component if component is None else component
        strength = strength * adapter_dir.strength
    scans: list[tuple[LoadedModel, SiteScan]] = []

    def module_paths() -> list[str]:  # a folder is read before the model, a file (kohya names) after
        loaded = load_model(model)
        scans.append((loaded, scan_sites(loaded, PEFT_OPS)))
        return [site.module_path for site in scans[0][1].sites]

    opened = open_adapter(adapter_dir, module_paths, component=component, strength=strength)
    config, weights, folder = opened.config, opened.weights, opened.origin
    with file_keys_in_errors(weights):  # a LoRA file's errors name its own keys
        source = str(weights.path)
        saved_names = list(config.raw.get("modules_to_save") or ())
        saved_keys: list[str] | None = [] if modules_to_save else None
        parsed = parse_keys(weights, modules_to_save=saved_names, source=source, saved=saved_keys)
        modules = parsed if modules is None else modules
        _check_flags(config, modules, source)
        if not scans:
            module_paths()
        loaded, scan = scans[0]
        modules, fused = split_fused(loaded, scan, modules, config, weights, merge=fused_merge, source=source)
        rules = parse_module_map(module_map)
        modules, packed = split_packed(scan, modules, module_map=rules, source=source)
        matches = match_modules(modules, scan, source=source, skip_unmatched=skip_unmatched)
        left_out = unmatched_modules(modules, matches)
        skipped_keys = tuple(key for module in left_out for key in module.keys.values())
        scalings = _scalings(loaded, matches, base_weights, source)
        graph = loaded.ir_model.graph
        position = {node.name: number for number, node in enumerate(graph)}
        planner = _Planner(loaded, graph, config, weights, adapter_name, scalings)
        for match in sorted(matches, key=lambda m: min(position[s.node] for s in m.sites)):
            planner.add(match)
        for group in packed:
            planner.add_packed(group)
        branches = tuple(sorted(planner.branches, key=lambda b: position[b.site.node]))
        warnings = list(planner.warnings)
        if left_out:
            paths = [module.full_path for module in left_out]
            listed = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
            warnings.append(
                f"skipped {len(skipped_keys)} adapter key(s) of {len(paths)} module(s) the graph does not "
                f"have (--skip-unmatched): {listed}"
            )
        plan = Plan(branches, (), tuple(warnings))
        scaled = tuple(node for node, scaling in scalings.items() if scaling.factor is not None)
        saved = plan_saved_modules(scan, saved_keys or (), weights, adapter_name, graph)
    return PeftPlan(
        plan, planner.values, planner.extras, config, folder, scaled, fused, saved,
        weights if saved else None, skipped_keys,
    )  # fmt: skip


def _scalings(
    model: LoadedModel, matches: list[ModuleMatch], base_weights: str | os.PathLike | None, source: str
) -> dict[str, SiteScaling]:
    """Without base weights: refuse sites the exporter folded a BatchNorm into. With them: each adapted
    site compared with its module's parameter (:func:`~lora_onnx.sites.folded_weights.compare_site`)."""
    if base_weights is None:
        refuse_folded(find_folded(model, (site for match in matches for site in match.sites)), source)
        return {}
    base = BaseWeights(base_weights)
    folds = {fold.site: fold for fold in find_folded(model, (s for m in matches for s in m.sites))}
    scalings = {}
    for match in matches:
        for site in match.sites:
            fold = folds.get(site.node)
            if fold is not None and not fold.output_side:
                refuse_folded([fold], source)
            paths = list(dict.fromkeys((match.graph_path, match.module.path, site.module_path)))
            scalings[site.node] = compare_site(model, site, base, paths)
    return scalings


def _check_flags(config: PeftAdapterConfig, modules: list[AdapterModule], source: str) -> None:
    """use_dora / lora_bias in the config must agree with the keys (PEFT would silently re-initialise)."""
    for module in modules:
        roles = set(module.keys)
        has_magnitude = "lora_magnitude_vector" in roles
        if config.use_dora != has_magnitude:
            raise AdapterError(
                f"{source}: adapter_config.json {'sets' if config.use_dora else 'does not set'} use_dora, "
                f"but module {module.path!r} {'has no' if config.use_dora else 'has a'} "
                "lora_magnitude_vector key"
            )
        if module.kind == "embedding":
            if "lora_B.bias" in roles:
                raise AdapterError(f"{source}: embedding {module.path!r} has a lora_B.bias (PEFT has none)")
            continue
        if "lora_B.bias" in roles and not config.lora_bias:
            raise AdapterError(
                f"{source}: key {module.keys['lora_B.bias']!r} is a lora_B bias, but adapter_config.json "
                "does not set lora_bias"
            )
        if config.lora_bias and "lora_B.bias" not in roles:
            raise AdapterError(
                f"{source}: adapter_config.json sets lora_bias, but module {module.path!r} has no "
                "lora_B.bias key"
            )


def _shape(values: tuple[int, ...]) -> str:
    return str(tuple(int(v) for v in values))


class _Planner:
    """Accumulates branches, tensors and extras module by module."""

    def __init__(
        self,
        model: LoadedModel,
        graph: ir.Graph,
        config: PeftAdapterConfig,
        weights: SafetensorsFile | RemappedWeights,
        adapter: str,
        scalings: Mapping[str, SiteScaling],
    ) -> None:
        self.model, self.config, self.weights, self.adapter = model, config, weights, adapter
        self.names, self.nodes = FreshNames(graph), nodes_by_name(graph)
        self.scalings = scalings
        self.source = str(weights.path)
        self.branches: list[BranchPlan] = []
        self.values: dict[str, np.ndarray] = {}
        self.extras: dict[str, PeftBranchExtras] = {}
        self.warnings: list[str] = []

    def _read(self, key: str) -> np.ndarray:
        return np.asarray(self.weights.read(key))

    def _check(self, key: str, site: Site, expected: tuple[int, ...], what: str = "") -> None:
        actual = self.weights.tensors[key].shape
        if actual != expected:
            weight = site.weight
            raise AdapterError(
                f"{self.source}: key {key!r} has shape {_shape(actual)}, but {what or 'it'} needs "
                f"{_shape(expected)} for {site.op} node {site.node!r} ({site.module_path}, weight "
                f"{weight.initializer!r} {_shape(weight.node_shape)})"
            )

    def add_packed(self, group: PackedGroup) -> None:
        """One block branch for the modules on a packed projection (:mod:`lora_onnx.adapters.peft.packed`)."""
        refuse_extras(group, self.source)
        first = group.sites[0]
        tensors: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for name, module in group.members.items():
            rank = self.config.rank_for(module.full_path)
            scale = self.config.scale(rank, self.config.alpha_for(module.full_path))
            a_key, b_key = module.key("lora_A"), module.key("lora_B")
            note = f"rank {rank} (adapter_config.json r / rank_pattern for {module.path!r})"
            self._check(a_key, first, (rank, first.in_features), note)
            b_shape = self.weights.tensors[b_key].shape
            if len(b_shape) != 2 or b_shape[1] != rank:
                raise AdapterError(
                    f"{self.source}: key {b_key!r} has shape {list(b_shape)}, but {note} needs (out, {rank})"
                )
            a, b = kind_of(first.op).from_peft(self._read(a_key), self._read(b_key))
            tensors[name] = (a, b, scale)
        a_packed, b_packed = block_branch(group, first.out_features, tensors, self.source)
        dtype = np_dtype(first.dtype)
        names = (".lora_A.weight", ".lora_B.weight")
        stem = unique_stem(self.names, tensor_stem(group.graph_path, self.adapter), names)
        a_name, b_name = stem + names[0], stem + names[1]
        self.values[a_name] = np.ascontiguousarray(a_packed, dtype)
        self.values[b_name] = np.ascontiguousarray(b_packed, dtype)
        rank = a_packed.shape[1]
        for site in group.sites:
            self.branches.append(
                BranchPlan(
                    site=site, adapter=self.adapter, rank=rank, alpha=float(rank), scale=1.0, stem=stem,
                    a_name=a_name, b_name=b_name,
                )
            )  # fmt: skip
            self.extras[site.node] = PeftBranchExtras(
                adapter_path=group.peft_path, base_bias=_base_bias(self.nodes, site)
            )

    def add(self, match: ModuleMatch) -> None:
        module = match.module
        embedding = module.kind == "embedding"
        a_key = module.key("lora_embedding_A" if embedding else "lora_A")
        b_key = module.key("lora_embedding_B" if embedding else "lora_B")
        rank = self.config.rank_for(module.full_path)
        alpha = self.config.alpha_for(module.full_path)
        scale = self.config.scale(rank, alpha)
        for site in match.sites:
            self._check_site(module, site, rank, a_key, b_key)
        first = match.sites[0]
        kind = kind_of(first.op)
        factor = self._factor(match)
        # PEFT's layouts -> the kind's storage layouts (dense (r, in) -> (in, r); conv's are the same)
        a, b = kind.from_peft(self._read(a_key), self._read(b_key))
        dtype = np_dtype(first.dtype)
        a, b = np.ascontiguousarray(a, dtype), np.ascontiguousarray(b, dtype)
        b_unscaled = b
        if factor is not None:
            # A BatchNorm folded into the weight scales each output channel by f, PEFT's branch with it.
            axis_shape = kind.form.channel_axis(b.ndim)
            b = np.ascontiguousarray(np.asarray(b, np.float64) * factor.reshape(axis_shape), dtype)

        names = (
            (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
        )
        optional = tuple(
            suffix
            for role, suffix in (
                ("lora_magnitude_vector", ".lora_magnitude_vector"),
                ("lora_B.bias", ".lora_B.bias"),
            )
            if role in module.keys
        )
        stem = unique_stem(self.names, tensor_stem(match.graph_path, self.adapter), (*names, *optional))
        a_name, b_name = stem + names[0], stem + names[1]
        self.values[a_name], self.values[b_name] = a, b
        magnitude = lora_bias = ""
        if "lora_magnitude_vector" in module.keys:
            magnitude = stem + ".lora_magnitude_vector"
            self.values[magnitude] = np.asarray(self._read(module.key("lora_magnitude_vector")), dtype)
        if "lora_B.bias" in module.keys:
            lora_bias = stem + ".lora_B.bias"
            bias = np.asarray(self._read(module.key("lora_B.bias")), np.float64)
            self.values[lora_bias] = np.asarray(bias * factor if factor is not None else bias, dtype)

        norms: dict[str, str] = {}  # one DoRA norm per distinct weight (a module run twice may share one)
        for site in match.sites:
            norm = ""
            if magnitude:
                norm = norms.get(site.weight.initializer, "")
                if not norm:
                    norm = self.names(stem + ".lora_weight_norm")
                    shape = self.weights.tensors[module.key("lora_magnitude_vector")].shape
                    scaling = self.scalings.get(site.node)
                    original = scaling.original if scaling is not None and factor is not None else None
                    self.values[norm] = weight_norm(
                        self.model, site, a, b_unscaled, scale, shape, weight=original
                    ).astype(dtype)
                    norms[site.weight.initializer] = norm
            a_group, b_group = kind.peft_groups(site)
            self.branches.append(
                BranchPlan(
                    site=site,
                    adapter=self.adapter,
                    rank=rank,
                    alpha=alpha,
                    scale=scale,
                    stem=stem,
                    a_name=a_name,
                    b_name=b_name,
                    a_group=a_group,
                    b_group=b_group,
                )
            )
            self.extras[site.node] = PeftBranchExtras(
                adapter_path=module.path,
                magnitude=magnitude,
                weight_norm=norm,
                lora_bias=lora_bias,
                base_bias=_base_bias(self.nodes, site),
            )
            self.warnings.extend(kind.peft_notes(site))

    def _factor(self, match: ModuleMatch) -> np.ndarray | None:
        """The per-output-channel factor of the module's sites (None: plain), the same for all of them."""
        found = [
            self.scalings[site.node].factor if site.node in self.scalings else None for site in match.sites
        ]
        first = found[0]
        for site, other in zip(match.sites, found, strict=True):
            same = (first is None) == (other is None) and (first is None or np.allclose(first, other))
            if not same:
                raise AdapterError(
                    f"{self.source}: module {match.module.path!r} runs at several nodes whose weights fold "
                    f"different per-channel factors ({match.sites[0].node!r}, {site.node!r}); one branch "
                    "cannot serve both: re-export without the BatchNorm folded"
                )
        return first

    def _check_site(self, module: AdapterModule, site: Site, rank: int, a_key: str, b_key: str) -> None:
        """Every tensor of ``module`` against one of its sites, in PEFT's layouts."""
        if site.gemm is not None and (site.gemm.alpha != 1.0 or site.gemm.beta != 1.0):
            raise AdapterError(
                f"{self.source}: module {module.path!r} is Gemm node {site.node!r} with "
                f"alpha={site.gemm.alpha}, beta={site.gemm.beta}: its stored weight is not the PyTorch "
                "module's, so PEFT's tensors do not apply to it"
            )
        kind = kind_of(site.op)
        rank_note = (
            f"rank {rank} (lora_A's rows for {module.path!r})"
            if isinstance(self.config, FileAdapterConfig)
            else f"rank {rank} (adapter_config.json r / rank_pattern for {module.path!r})"
        )
        refusal = kind.peft_rank_refusal(site, rank)
        if refusal:
            raise AdapterError(f"{self.source}: module {module.path!r}: {refusal}; PEFT requires it")
        a_shape, b_shape = kind.peft_shapes(site, rank)
        self._check(a_key, site, a_shape, rank_note)
        self._check(b_key, site, b_shape, rank_note)
        magnitude_shape = kind.peft_magnitude_shape(site)
        base_shape = kind.peft_base_shape(site)
        if "lora_magnitude_vector" in module.keys:
            self._check(module.key("lora_magnitude_vector"), site, magnitude_shape, "its DoRA magnitude")
        if "lora_B.bias" in module.keys:
            self._check(module.key("lora_B.bias"), site, (site.out_features,), "its lora_B bias")
        if module.base_weight is not None:
            # PEFT saves targeted embedding / lm_head weights whole; a different shape means a resized vocab.
            self._check(module.base_weight, site, base_shape, "the saved base weight (a resized vocabulary?)")


def _base_bias(nodes: Mapping[str, ir.Node], site: Site) -> str:
    """The value the base node adds as its bias, "" when it adds none."""
    return kind_of(site.op).base_bias(nodes, site)
