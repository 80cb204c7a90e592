"""``inject``: add fresh LoRA branches (load -> find sites -> plan -> rewrite -> save -> validate)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_onnx.model.graph import FreshNames
from lora_onnx.model.load import LoadedModel, ModelLike, TensorProducer, load_model
from lora_onnx.model.manifest import BranchRecord, adapter_names, read_branches
from lora_onnx.model.save import check_output_paths, save_model
from lora_onnx.proofs.quantized import dequantized_rtol
from lora_onnx.proofs.validation import InputsLike, ValidationReport, validate
from lora_onnx.recipes.config import LoraConfig
from lora_onnx.recipes.init import initial_value
from lora_onnx.recipes.plan import Plan, plan_branches

# existing_branches, refuse_existing_adapter and scan_sites live with the sites (lower layers use them)
from lora_onnx.sites.find import SiteScan, existing_branches, refuse_existing_adapter, scan_sites
from lora_onnx.stages.fold import fold_branches, fold_tolerance
from lora_onnx.stages.insert import insert_branches

#: Zero-B branches add exact zeros, so outputs must agree far tighter than the default tolerance.
UNCHANGED_RTOL, UNCHANGED_ATOL = 1e-6, 1e-6
#: What to do when the proof of a non-zero init cannot fold a branch (inject has no partial fold).
FOLD_PROOF_REMEDY = (
    "--validate proves a non-zero init (--init random) against the rewrite's own fold, which needs every "
    "branch foldable: validate with --init default or gaussian (B = 0, outputs must stay unchanged), or "
    "without --validate"
)


@dataclass(frozen=True)
class InjectResult:
    """What ``inject`` did: the rewritten model, its branches, and every site it passed over and why."""

    model: LoadedModel
    branches: tuple[BranchRecord, ...]
    scan: SiteScan
    plan: Plan
    output: Path | None = None
    validation: ValidationReport | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.plan.warnings


def prove(
    source: LoadedModel,
    rewritten: LoadedModel,
    zero_init: bool,
    *,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    allow_nonfinite: bool = False,
    inputs: InputsLike = None,
) -> ValidationReport:
    """A rewrite's proof: zero-B branches leave outputs unchanged; others equal their own fold.
    ``inputs`` (an .npz path or arrays) replaces the generated inputs."""
    if zero_init:
        return validate(
            source, rewritten, providers=providers, rtol=UNCHANGED_RTOL, atol=UNCHANGED_ATOL, dims=dims,
            allow_nonfinite=allow_nonfinite, inputs=inputs,
        )  # fmt: skip
    # Fold only the adapters this rewrite added: earlier ones may be slots (lora_onnx.stages.slots), which
    # cannot fold.
    before = set(adapter_names(existing_branches(source)))
    added = set(adapter_names(read_branches(rewritten.ir_model))) - before
    # A quantized base folds into a float weight; its own kernels' rounding is measured and allowed.
    folded = fold_branches(rewritten, adapters=added, dequantize=True, remedy=FOLD_PROOF_REMEDY)
    rtol, atol = fold_tolerance(folded)
    quantized_rtol = dequantized_rtol(
        rewritten, added, providers=providers, dims=dims, inputs=inputs, base=source
    )
    return validate(
        rewritten, folded.model, providers=providers, rtol=quantized_rtol or rtol, atol=atol, dims=dims,
        allow_nonfinite=allow_nonfinite, inputs=inputs,
    )  # fmt: skip


def inject(
    model: ModelLike,
    config: LoraConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    validate: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    link_data: bool = False,
    allow_nonfinite: bool = False,
    inputs: InputsLike = None,
) -> InjectResult:
    """Add one fresh LoRA branch per targeted site of ``model`` and optionally save and prove it.

    Reads tensor shapes only, never weight bytes. With ``validate`` the rewrite is checked in
    onnxruntime before anything is written: outputs unchanged for zero-B inits, otherwise equal to the
    rewrite's own fold. An output beside the input refers to the input's data files; elsewhere they are
    cloned (reflink) or copied, or hard-linked with ``link_data`` (then onnx >= 1.21's ``onnx.load`` and
    checker refuse both the output and the input while both exist; onnxruntime does not).
    ``allow_nonfinite`` lets the proof compare NaN / Inf outputs position by position; ``inputs`` (an
    .npz path or arrays by input name) replaces its generated inputs. Raises
    :class:`~lora_onnx.errors.LoraOnnxError` subclasses for user errors.
    """
    config = config or LoraConfig()
    source = load_model(model)
    if output is not None:
        check_output_paths(source, output)
    refuse_existing_adapter(source, config.adapter_name)
    scan = scan_sites(source, config.ops)
    plan = plan_branches(scan, config, FreshNames(source.ir_model.graph)).require_branches()
    # A model that keeps its weights outside the .onnx (the large ones) gets deferred LoRA tensors: each is
    # generated when it is written, so a rank-64 adapter on an LLM (~100s of MB) is never in memory whole.
    defer = bool(source.external_refs())
    values: dict[str, np.ndarray | TensorProducer] = {}
    for branch in plan.branches:
        for name, tensor in ((branch.a_name, "A"), (branch.b_name, "B")):
            if name not in values:
                make = functools.partial(initial_value, branch, tensor, config.init, config.seed)
                values[name] = make if defer else make()
    zero_init = config.init != "random"
    inserted = insert_branches(source, plan.branches, values, zero_init=zero_init)
    rewritten, records = inserted.model, inserted.records
    report = (
        prove(
            source,
            rewritten,
            zero_init,
            providers=providers,
            dims=dims,
            allow_nonfinite=allow_nonfinite,
            inputs=inputs,
        )
        if validate
        else None
    )
    written = None
    if output is not None and (report is None or report.ok):
        written = save_model(rewritten, output, link_data=link_data)
    return InjectResult(rewritten, records, scan, plan, written, report)
