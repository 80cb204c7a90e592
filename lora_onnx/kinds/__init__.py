"""Op kinds as plug-ins: one module per ONNX op type a LoRA branch can sit beside.

Each kind (:class:`~lora_onnx.kinds.base.OpKind`) says how a node becomes a site or why it cannot, its
weight layout and rank bounds, and how PEFT's tensors map onto it; its branch form
(:class:`~lora_onnx.kinds.base.BranchForm`: dense, conv, conv_transpose) says the A/B shapes, init fan-in,
the branch's nodes, the fold delta in row blocks, the stacked (mixed-batch) layout and slot dims. The rest
of lora-onnx asks :func:`kind_of` / :func:`form_of` and never tests an op type itself.

Adding a kind: one module here that subclasses the closest kind or form and registers itself, plus its
import below.
"""

from lora_onnx.kinds import conv, conv_transpose, gather, gemm, matmul, matmulnbits  # noqa: F401  (registers)
from lora_onnx.kinds.base import (
    BranchForm,
    OpKind,
    SiteForm,
    SitePair,
    all_kinds,
    form_of,
    kind_for_node,
    kind_of,
)

__all__ = [
    "BranchForm",
    "OpKind",
    "SiteForm",
    "SitePair",
    "all_kinds",
    "form_of",
    "kind_for_node",
    "kind_of",
]
