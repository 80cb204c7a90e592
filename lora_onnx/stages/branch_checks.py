"""Check a rewritten model's branch tensors against their base weights before anything is computed.

A model can reach ``merge`` with branch tensors that no longer fit their weight (edited by another tool,
a hand-made adapter, a corrupted file). Folding would then fail deep inside numpy with a broadcast error;
this check turns that into one line naming the tensor, its shape and the shape the weight needs, from
tensor metadata only.
"""

from __future__ import annotations

from collections.abc import Iterable

from lora_onnx.errors import AdapterError
from lora_onnx.kinds import form_of
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.tensors import shape_of
from lora_onnx.variants import variant_for


def expected_shapes(
    branch: BranchRecord, weight: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (A, B) shapes a branch needs for a source weight of shape ``weight``; None for layouts
    this check does not know (they are left to the code that made them)."""
    return form_of(branch.kind).expected_shapes(branch, weight)


def check_branch_shapes(model: LoadedModel, branches: Iterable[BranchRecord]) -> None:
    """Raise :class:`AdapterError` for the first branch with constant A and B (see
    :attr:`~lora_onnx.variants.BranchVariant.constant_tensors`) whose A or B does not fit its weight."""
    initializers = {tensor.name: tensor for tensor in model.proto.graph.initializer}
    for branch in branches:
        if not variant_for(branch).constant_tensors or branch.weight not in initializers:
            continue  # slots, stacks and missing weights are refused by the fold with a reason
        weight = shape_of(initializers[branch.weight])
        wanted = expected_shapes(branch, weight)
        if wanted is None:
            continue
        for name, shape in zip((branch.a, branch.b), wanted, strict=True):
            tensor = initializers.get(name)
            if tensor is None:
                raise AdapterError(
                    f"{model.name}: the branch at node {branch.site!r} ({branch.module_path}) refers to "
                    f"tensor {name!r}, which the model does not have"
                )
            actual = shape_of(tensor)
            if actual != shape:
                raise AdapterError(
                    f"{model.name}: tensor {name!r} of the branch at node {branch.site!r} "
                    f"({branch.module_path}) has shape {list(actual)}, but weight {branch.weight!r} "
                    f"{list(weight)} at rank {branch.rank} needs {list(shape)}; the model was changed after "
                    "lora-onnx rewrote it, or the adapter does not fit this model"
                )
