"""What every branch variant says about itself, and the registry that picks a branch's variant.

Modelled on PEFT's ``LoraVariant`` (``peft/tuners/lora/variants.py``): one class per variant with the
hooks it needs, chosen from the branch alone. A :class:`~lora_onnx.model.manifest.BranchRecord` names its
family in ``variant`` (``constant``, ``slot``, ``mixed``); within the constant family, a DoRA magnitude
or a ``lora_B.bias`` picks a finer plug-in. :func:`variant_for` finds the one plug-in that claims a
record; a record no plug-in (or two) claims is a one-line error, never a guess.

Hooks, each with the plain-LoRA answer here (plug-ins override only what differs):

- folding: :meth:`BranchVariant.fold_refusal` (why this branch cannot fold, None when it can),
  :meth:`~BranchVariant.weight_refusal` (why the branches sharing a weight cannot fold together),
  :meth:`~BranchVariant.channel_factor` (a per-output-channel factor applied to ``W + delta``) and
  :meth:`~BranchVariant.fold_beside_weight` (what else the fold edits: a bias);
- checks: :attr:`~BranchVariant.constant_tensors` (A and B are constants in the site's shapes, so
  their shapes are checked against the weight and their values can be exported);
- binding and removal: :meth:`~BranchVariant.takes` / :meth:`~BranchVariant.bind` (an adapter file
  for slots, an adapter index for stacks: one adapter as constant branches, the rest removed) and
  :meth:`~BranchVariant.strip` (the model without this variant's branches, nothing folded).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from lora_onnx.errors import LoraOnnxError

if TYPE_CHECKING:  # the manifest reads the registry, so the records' modules are imported for types only
    import onnx_ir as ir

    from lora_onnx.model.load import LoadedModel, TensorProducer
    from lora_onnx.model.manifest import BranchRecord


@dataclass(frozen=True)
class AdapterChoice:
    """Which one adapter a fold keeps of a model that holds several in one place: the adapter file
    ``file`` (at ``strength``) for LoRA slots, or the position ``index`` in mixed-batch stacks."""

    file: str | os.PathLike | None = None
    strength: float | None = None
    index: int | None = None


@dataclass(frozen=True)
class Binding:
    """A model with the chosen adapter as constant branches: ``model``, the ``reference`` it must equal
    (the input run with that adapter active), the new constant ``bound`` records, and the branches
    ``removed`` because the choice leaves them off (reported to the user)."""

    model: LoadedModel
    reference: LoadedModel
    bound: tuple[BranchRecord, ...] = ()
    removed: tuple[BranchRecord, ...] = ()


class BranchVariant:
    """One kind of branch and everything the tool does differently for it (see the module doc)."""

    #: The plug-in's name, as messages and tests say it.
    name: ClassVar[str] = ""
    #: The ``BranchRecord.variant`` string the plug-in's branches are recorded with.
    recorded_as: ClassVar[str] = "constant"
    #: A and B are initializers of the site's own shapes: shape checks apply, their values can be exported.
    constant_tensors: ClassVar[bool] = True
    #: The fold multiplies its whole weight per output channel, so it must be the weight's only delta.
    rescales_weight: ClassVar[bool] = False

    def matches(self, record: BranchRecord) -> bool:
        """Whether ``record`` is a branch of this variant."""
        return record.variant == self.recorded_as

    def fold_refusal(self, record: BranchRecord) -> str | None:
        """Why ``record`` cannot be folded into its weight, None when it can (its branch form says)."""
        from lora_onnx.kinds import form_of  # the manifest reads this registry; the kinds read the manifest

        return form_of(record.kind).fold_refusal(record)

    def weight_refusal(self, weight: str, on_weight: Sequence[BranchRecord]) -> str | None:
        """Why the branches ``on_weight`` (every branch on ``weight``, folded or not, this variant's among
        them) cannot be folded together; None when this variant does not mind."""
        return None

    def channel_factor(self, model: LoadedModel, record: BranchRecord, ndim: int) -> np.ndarray | None:
        """A factor multiplying the folded ``W + delta`` per output channel, shaped to broadcast over the
        ``ndim``-axis source weight; None for none."""
        return None

    def fold_beside_weight(
        self, model: LoadedModel, graph: ir.Graph, records: Sequence[BranchRecord]
    ) -> dict[str, TensorProducer]:
        """Edit ``graph`` (the fold's onnx-ir copy of ``model``, branches removed) for what ``records`` add
        beyond the weight's delta; returns producers of tensors changed in place (run at save time)."""
        return {}

    def takes(self, choice: AdapterChoice) -> bool:
        """Whether ``choice`` picks one adapter of this variant's branches."""
        return False

    def bind(self, model: LoadedModel, choice: AdapterChoice) -> Binding:
        """``model`` with the adapter ``choice`` picks as constant branches (see :class:`Binding`)."""
        raise NotImplementedError(f"{self.name} branches are not bound to a chosen adapter")

    def strip(self, model: LoadedModel) -> LoadedModel:
        """``model`` without this variant's branches (nothing folded)."""
        raise NotImplementedError(f"{self.name} branches are removed by folding them")


_V = TypeVar("_V", bound=BranchVariant)

#: Every plug-in, in registration order (see :func:`register`).
VARIANTS: list[BranchVariant] = []


def register(cls: type[_V]) -> type[_V]:
    """Class decorator: add one instance of ``cls`` to :data:`VARIANTS`."""
    VARIANTS.append(cls())
    return cls


def resolve(record: BranchRecord) -> BranchVariant:
    """The one plug-in claiming ``record``; ``ValueError`` (naming the branch) when none or several do."""
    claims = [variant for variant in VARIANTS if variant.matches(record)]
    if len(claims) == 1:
        return claims[0]
    where = f"the branch at node {record.site!r}"
    if not claims:
        known = ", ".join(sorted({variant.recorded_as for variant in VARIANTS}))
        raise ValueError(
            f"{where} has variant {record.variant!r}, which this lora-onnx does not know (it knows {known})"
        )
    names = " and ".join(variant.name for variant in claims)
    raise ValueError(f"{where} is recorded as {names} at once, which no lora-onnx branch can be")


def variant_for(record: BranchRecord) -> BranchVariant:
    """The plug-in of ``record``; :class:`LoraOnnxError` (one line) for a record none or several claim."""
    try:
        return resolve(record)
    except ValueError as exc:
        raise LoraOnnxError(f"{exc}; the manifest was edited or written by a newer lora-onnx") from exc


def records_of(records: Iterable[BranchRecord], kind: type[BranchVariant]) -> tuple[BranchRecord, ...]:
    """The records whose plug-in is a ``kind`` (subclasses included)."""
    return tuple(record for record in records if isinstance(variant_for(record), kind))


def plug_in(kind: type[_V]) -> _V:
    """The registered instance of plug-in class ``kind``."""
    return next(variant for variant in VARIANTS if type(variant) is kind)  # type: ignore[return-value]


def binder_for(choice: AdapterChoice) -> BranchVariant | None:
    """The plug-in that binds ``choice`` (None when nothing is chosen)."""
    return next((variant for variant in VARIANTS if variant.takes(choice)), None)


def by_variant(records: Iterable[BranchRecord]) -> Mapping[BranchVariant, list[BranchRecord]]:
    """``records`` grouped by plug-in, in first-seen order."""
    groups: dict[BranchVariant, list[BranchRecord]] = {}
    for record in records:
        groups.setdefault(variant_for(record), []).append(record)
    return groups
