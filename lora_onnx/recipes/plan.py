"""Decide, per site, the branch a recipe asks for: rank, alpha, scale, tensor names and shapes.

Planning touches no graph and no weight bytes; it turns a :class:`SiteScan` and a :class:`LoraConfig`
into :class:`BranchPlan` records. Sites that share a weight initializer *and* a module path (a module
that runs more than once) share one pair of LoRA tensors, as PEFT shares one adapter per module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lora_onnx.common.names import nearest
from lora_onnx.errors import TargetError
from lora_onnx.kinds import BranchForm, kind_of
from lora_onnx.recipes.config import DEFAULT_ADAPTER, DEFAULT_RANK, LoraConfig
from lora_onnx.sites.find import Site, SiteScan, Skipped
from lora_onnx.sites.targets import module_matches, name_matches


@dataclass(frozen=True)
class BranchPlan:
    """One site's branch, its tensors in the layouts of the site's branch form (:mod:`lora_onnx.kinds`):
    dense A (in, r) and B (r, out), as onnxruntime's and Olive's adapters expect; conv A (r, in/a_group,
    k...) and B (out, r/b_group, 1...); ConvTranspose A (in, r/a_group, k...) and B (out, r/b_group, 1...).
    ``a_group`` equals the base group for a fresh adapter (so it folds back) and 1 for PEFT's dense conv A."""

    site: Site
    adapter: str
    rank: int
    alpha: float
    scale: float
    stem: str
    a_name: str
    b_name: str
    a_group: int = 1
    b_group: int = 1

    @property
    def form(self) -> BranchForm:
        return kind_of(self.site.op).form

    @property
    def kind(self) -> str:
        """The branch form's name (``BranchRecord.kind``)."""
        return self.form.name

    @property
    def a_shape(self) -> tuple[int, ...]:
        return self.form.a_shape(self.site, self.rank, self.a_group)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return self.form.b_shape(self.site, self.rank, self.b_group)

    @property
    def params(self) -> int:
        """LoRA parameters of this branch's A and B."""
        count_a = count_b = 1
        for dim in self.a_shape:
            count_a *= dim
        for dim in self.b_shape:
            count_b *= dim
        return count_a + count_b


@dataclass(frozen=True)
class Plan:
    """Branches for the targeted sites, targeted sites the recipe cannot serve, and warnings.

    ``empty_reason`` explains an empty plan (no site at all, no target match, every target skipped).
    """

    branches: tuple[BranchPlan, ...]
    skipped: tuple[Skipped, ...]
    warnings: tuple[str, ...] = ()
    empty_reason: str = ""

    def require_branches(self) -> Plan:
        """This plan, or :class:`TargetError` with ``empty_reason`` when it has no branch."""
        if not self.branches:
            raise TargetError(self.empty_reason)
        return self

    @property
    def lora_params(self) -> int:
        """LoRA parameters added, counting tensors shared by several sites once."""
        return sum({branch.a_name: branch.params for branch in self.branches}.values())


def tensor_stem(module: str, adapter: str) -> str:
    """``<module>`` for the default adapter, ``<module>.<adapter>`` otherwise (the PEFT key's module part)."""
    return module if adapter == DEFAULT_ADAPTER else f"{module}.{adapter}"


class NameSpace(Protocol):
    """The names of one graph that are taken: :class:`~lora_onnx.model.graph.FreshNames`."""

    def is_free(self, name: str) -> bool: ...

    def reserve(self, name: str) -> None: ...


def unique_stem(
    names: NameSpace, wanted: str, suffixes: Sequence[str] = (".lora_A.weight", ".lora_B.weight")
) -> str:
    """``wanted`` (or ``wanted_1``...) such that every ``stem + suffix`` name is free in ``names`` (a
    :class:`~lora_onnx.model.graph.FreshNames`); they are reserved."""
    stem, number = wanted, 0
    while not all(names.is_free(stem + suffix) for suffix in suffixes):
        number += 1
        stem = f"{wanted}_{number}"
    for suffix in suffixes:
        names.reserve(stem + suffix)
    return stem


def plan_branches(scan: SiteScan, config: LoraConfig, names: NameSpace, *, check_ranks: bool = True) -> Plan:
    """Branches for the sites ``config`` targets (see :meth:`Plan.require_branches` for an empty plan).

    ``check_ranks`` weighs each rank against its site's min / max (in, out) (a warning, or a refusal when
    it is no low-rank adapter at all); LoRA slots, whose rank is free, plan without it.
    """
    selected = [site for site in scan.sites if kind_of(site.op).key in config.ops]
    chosen = [site for site in selected if config.targets.selects(site.module_path)]
    warnings = tuple(_unmatched_target_warnings(config, selected))
    if not chosen:
        return Plan((), (), warnings, _nothing_selected(config, scan, selected))
    branches: list[BranchPlan] = []
    skipped: list[Skipped] = []
    shared: dict[tuple[str, str, int], str] = {}
    for site in chosen:
        rank = config.rank_for(site.module_path)
        alpha = config.alpha_for(site.module_path)
        a_group, b_group = kind_of(site.op).form.fresh_groups(site)
        if rank % max(a_group, b_group):
            skipped.append(_rank_group_skip(site, rank))
            continue
        key = (site.module_path, site.weight.initializer, rank)
        if key not in shared:
            shared[key] = unique_stem(names, tensor_stem(site.module_path, config.adapter_name))
        stem = shared[key]
        branches.append(
            BranchPlan(
                site=site,
                adapter=config.adapter_name,
                rank=rank,
                alpha=alpha,
                scale=config.scale(rank, alpha),
                stem=stem,
                a_name=f"{stem}.lora_A.weight",
                b_name=f"{stem}.lora_B.weight",
                a_group=a_group,
                b_group=b_group,
            )
        )
    if check_ranks:
        warnings += _rank_bound_warnings(branches)
    reasons = "; ".join(f"{s.node}: {s.reason}" for s in skipped[:3])
    empty_reason = "" if branches else f"no targeted site can take a branch ({reasons})"
    return Plan(tuple(branches), tuple(skipped), warnings, empty_reason)


def rank_bounds(site: Site) -> tuple[int, int]:
    """(min, max) of the sides of ``site``'s weight as a matrix, the ranks that add capacity end at min
    (a grouped conv's are the groups times each group's; see each kind's ``rank_bounds``)."""
    return kind_of(site.op).rank_bounds(site)


def _rank_bound_warnings(branches: Sequence[BranchPlan]) -> tuple[str, ...]:
    """Ranks above min(in, out) of a site add parameters, not capacity: PEFT allows them (the default
    rank 8 meets them on small heads such as a 3-class classifier), so they get a warning naming the
    sites. A rank above max(in, out) too is no low-rank adapter at all (``--rank 100000`` on a 64-wide
    model wrote 1.2 GB) and is refused, unless it is at most PEFT's default rank (toy models keep
    working with the defaults)."""
    over = {
        b.site.module_path: (b.rank, *rank_bounds(b.site))
        for b in branches
        if b.rank > rank_bounds(b.site)[0]
    }
    absurd = {path: bounds for path, bounds in over.items() if bounds[0] > max(bounds[2], DEFAULT_RANK)}
    grouped = any(b.site.group > 1 and b.site.module_path in over for b in branches)
    why = " (per group for a grouped conv)" if grouped else ""
    if absurd:
        listing = ", ".join(
            f"{path} (min {low}, max {high})" for path, (_, low, high) in list(absurd.items())[:3]
        )
        more = f" and {len(absurd) - 3} more" if len(absurd) > 3 else ""
        path, (rank, low, _) = next(iter(absurd.items()))
        short = path.rsplit(".", 1)[-1]
        raise TargetError(
            f"rank {rank} exceeds both in and out features{why} of {len(absurd)} site(s): "
            f"{listing}{more}; "
            f"a rank above min(in, out) adds parameters, not capacity: lower --rank, or give such sites "
            f"their own with --rank-pattern {short}={low}, or --exclude {short}"
        )
    if not over:
        return ()
    listing = ", ".join(f"{path} (rank {rank}, min {low})" for path, (rank, low, _) in list(over.items())[:3])
    more = f" and {len(over) - 3} more" if len(over) > 3 else ""
    path, (_, low, _) = next(iter(over.items()))
    short = path.rsplit(".", 1)[-1]
    return (
        f"the rank exceeds min(in, out){why} at {len(over)} site(s): {listing}{more}; PEFT allows it, but "
        f"it adds parameters, not capacity: --rank-pattern {short}={low} or --exclude {short} avoids it",
    )


def _rank_group_skip(site: Site, rank: int) -> Skipped:
    group, noun = site.group, kind_of(site.op).noun or site.op
    reason = (
        f"rank {rank} is not a multiple of the {noun}'s group {group} (a foldable grouped branch needs one); "
        f"use a rank that is a multiple of {group}, a rank_pattern for this module, or exclude it"
    )
    return Skipped(site.node, site.op, site.module_path, reason)


def _unmatched_target_warnings(config: LoraConfig, sites: Sequence[Site]) -> list[str]:
    """A warning per target or exclude name (or regex) that matches no site: likely a typo."""
    paths = [site.module_path for site in sites]
    targets = config.targets
    warnings = [
        f"target {name!r} matches no site{_nearest(name, paths)}"
        for name in targets.names
        if not name_matches_any(name, paths)
    ]
    warnings += [
        f"--exclude {name!r} matches no site, so it excludes nothing{_nearest(name, paths)}"
        for name in targets.exclude
        if not name_matches_any(name, paths)
    ]
    for flag, pattern in (("--target-regex", targets.regex), ("--exclude-regex", targets.exclude_regex)):
        # A lone --target-regex that matches nothing is an error (nothing selected), not a warning.
        lone = flag == "--target-regex" and not targets.names
        unmatched = pattern is not None and not any(module_matches(path, regex=pattern) for path in paths)
        if unmatched and not lone:
            what = "excludes" if flag == "--exclude-regex" else "selects"
            warnings.append(
                f"{flag} '{pattern}' matches no module path (it must match the whole path), so it {what} "
                f"nothing{_nearest(pattern, paths)}"
            )
    return warnings


def name_matches_any(name: str, paths: Iterable[str]) -> bool:
    return any(name_matches(path, [name]) for path in paths)


def _nothing_selected(config: LoraConfig, scan: SiteScan, selected: Sequence[Site]) -> str:
    if not scan.sites:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in scan.skipped[:3])
        detail = f" (skipped: {reasons})" if reasons else " (no Gemm, MatMul or Conv node)"
        return f"the model has no node that can take a LoRA branch{detail}"
    if not selected:
        ops = sorted(config.ops)
        return f"no site of the selected op types {ops}; the model has {len(scan.sites)} other sites"
    paths = [site.module_path for site in selected]
    probe = config.targets.names[0] if config.targets.names else (config.targets.regex or "")
    return f"no site matches the targets ({config.targets.describe()}){_nearest(probe, paths)}"


def _nearest(name: str, paths: Sequence[str]) -> str:
    """A hint listing the module paths closest to ``name``, for error messages."""
    if not paths:
        return ""
    return "; nearest module paths: " + ", ".join(nearest(name, paths, dotted=True))
