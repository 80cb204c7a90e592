"""The contract every graph stage keeps: check what it needs, do its work, check what it promises.

The model is onnx-ir's pass infrastructure (``PassBase``: ``requires`` / ``call`` / ``ensures``, returning
``PassResult(model, modified)``). A :class:`Stage` raises from :meth:`~Stage.requires` before it touches
anything (the user's mistake, named), returns one :class:`StageResult` from :meth:`~Stage.call`, and
:meth:`~Stage.ensures` checks the graph it made is sorted and every value it reads is defined, so a bug
in a stage is caught where it happens instead of as onnxruntime's load error later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from lora_onnx.errors import LoraOnnxError
from lora_onnx.kinds.site import Skipped
from lora_onnx.model.graph import FreshNames
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import BranchRecord

#: Branches rely on numpy-style broadcasting in Mul / Add, which ONNX has from opset 7 on.
MIN_OPSET = 7


class StageError(LoraOnnxError):
    """A stage broke its own promise (a lora-onnx bug): the graph it made is not sorted or not closed."""


@dataclass(frozen=True)
class StageResult:
    """What a stage made: the new model, the branch records it added (or folded), the sites it passed
    over with the reason, warnings for the user; ``modified`` is False when the model is unchanged."""

    model: LoadedModel
    records: tuple[BranchRecord, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()
    modified: bool = True


class Stage:
    """One graph stage. Subclasses implement :meth:`call` and add preconditions in :meth:`requires`."""

    #: What the stage does, for messages ("insert branches").
    name: ClassVar[str] = "stage"

    def requires(self, model: LoadedModel) -> None:
        """Raise a :class:`~lora_onnx.errors.LoraOnnxError` naming what ``model`` lacks."""

    def call(self, model: LoadedModel) -> StageResult:
        raise NotImplementedError

    def ensures(self, result: StageResult) -> None:
        """Raise :class:`StageError` when the stage's graph is not sorted or reads an undefined value."""
        if result.modified:
            check_graph(result.model, self.name)

    def __call__(self, model: LoadedModel) -> StageResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result)
        return result


def require_opset(model: LoadedModel, what: str, minimum: int = MIN_OPSET) -> None:
    """Refuse a model whose ONNX opset is older than ``minimum`` (``what`` needs it)."""
    opsets = model.ir_model.opset_imports
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is not None and version < minimum:
        raise LoraOnnxError(
            f"{model.name} uses opset {version}; {what} need opset {minimum} or newer "
            "(convert it with onnx.version_converter.convert_version)"
        )


def require_free(model: LoadedModel, names: Iterable[str], what: str) -> None:
    """Refuse names the model already uses for a value, an initializer or a node."""
    free = FreshNames(model.ir_model.graph)
    clash = sorted(name for name in set(names) if not free.is_free(name))
    if clash:
        raise LoraOnnxError(
            f"{model.name} already has value(s) named {', '.join(map(repr, clash[:3]))}, which the {what} "
            "would add; was this model rewritten before with the same adapter name?"
        )


def check_graph(model: LoadedModel, stage: str) -> None:
    """The main graph is sorted (every node input is a graph input, an initializer or an earlier node's
    output) and closed (every graph output is produced)."""
    graph = model.proto.graph
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    for position, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in defined:
                raise StageError(
                    f"internal error in {stage}: node {node.name!r} ({node.op_type}, position {position}) "
                    f"reads {name!r} before anything defines it; please report this with the model"
                )
        defined.update(name for name in node.output if name)
    missing = [v.name for v in graph.output if v.name not in defined]
    if missing:
        raise StageError(
            f"internal error in {stage}: graph output(s) {', '.join(map(repr, missing[:3]))} are not "
            "produced; please report this with the model"
        )
