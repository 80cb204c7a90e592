"""``inspect``: what a recipe would do to a model (sites, A/B shapes, parameter counts) and what it skips."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lora_onnx.model.graph import FreshNames
from lora_onnx.model.load import ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.tensors import numel, shape_of, type_name
from lora_onnx.recipes.config import LoraConfig
from lora_onnx.recipes.plan import plan_branches
from lora_onnx.sites.find import Skipped, existing_branches, scan_sites
from lora_onnx.sites.folded_weights import FoldedWeight, find_folded


@dataclass(frozen=True)
class SiteRow:
    """One site as ``inspect`` lists it; ``a_shape`` / ``b_shape`` are the stored LoRA tensor shapes."""

    node: str
    op: str
    module_path: str
    weight: str
    layout: str
    dtype: str
    in_features: int
    out_features: int
    rank: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    lora_params: int


@dataclass(frozen=True)
class Inspection:
    sites: tuple[SiteRow, ...]
    skipped: tuple[Skipped, ...]
    branches: tuple[BranchRecord, ...]
    base_params: int
    lora_params: int
    warnings: tuple[str, ...] = ()
    #: Sites whose weight the exporter folded an op into (a PEFT adapter on them needs base weights).
    folded: tuple[FoldedWeight, ...] = ()

    @property
    def lora_share(self) -> float:
        return self.lora_params / self.base_params if self.base_params else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "sites": [asdict(row) for row in self.sites],
            "skipped": [asdict(skip) for skip in self.skipped],
            "branches": [branch.to_json() for branch in self.branches],
            "warnings": list(self.warnings),
            "folded": [asdict(fold) | {"reason": fold.reason} for fold in self.folded],
            "totals": {
                "sites": len(self.sites),
                "skipped": len(self.skipped),
                "lora_params": self.lora_params,
                "base_params": self.base_params,
                "lora_share": self.lora_share,
            },
        }


def inspect_model(model: ModelLike, config: LoraConfig | None = None) -> Inspection:
    """Sites the recipe ``config`` (default: rank 8 on every site) would change, with shapes and counts.

    Sites the recipe cannot serve (e.g. a rank the conv's group does not divide) are listed as skipped
    with the reason, beside nodes that can take no branch at all.
    """
    config = config or LoraConfig()
    loaded = load_model(model)
    scan = scan_sites(loaded, config.ops)
    plan = plan_branches(scan, config, FreshNames(loaded.ir_model.graph))
    if not plan.branches and scan.sites and not config.targets.selects_everything:
        plan.require_branches()  # a target that matches nothing is the user's mistake: say so
    rows = tuple(
        SiteRow(
            node=branch.site.node,
            op=branch.site.op,
            module_path=branch.site.module_path,
            weight=branch.site.weight.initializer,
            layout=branch.site.layout,
            dtype=type_name(branch.site.dtype),
            in_features=branch.site.in_features,
            out_features=branch.site.out_features,
            rank=branch.rank,
            a_shape=branch.a_shape,
            b_shape=branch.b_shape,
            lora_params=branch.params,
        )
        for branch in plan.branches
    )
    branches = existing_branches(loaded)
    lora_tensors = {name for branch in branches for name in branch.tensors}
    base_params = sum(
        numel(shape_of(t)) for t in loaded.proto.graph.initializer if t.name not in lora_tensors
    )
    folded = find_folded(loaded, scan.sites)
    warnings = (*plan.warnings, *(fold.note for fold in folded))
    return Inspection(
        rows, (*scan.skipped, *plan.skipped), branches, base_params, plan.lora_params, warnings, folded
    )
