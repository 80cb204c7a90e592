"""``Gemm``: ``y = alpha * A' @ B' + beta * C`` with a constant B (transB=1 stores it (out, in), as
torch's Linear exports it). The branch computes in the node's orientation and carries the Gemm's alpha."""

from __future__ import annotations

import onnx

from lora_onnx.kinds.base import float_weight, register
from lora_onnx.kinds.dense import DenseKind
from lora_onnx.kinds.matmul import WEIGHT_FIRST
from lora_onnx.kinds.site import GemmAttrs, Site
from lora_onnx.model.graph import GraphIndex
from lora_onnx.model.module_paths import module_path


class GemmKind(DenseKind):
    op_type = "Gemm"
    key = "gemm"
    bias_input = True
    linear = True
    #: What TorchScript's constant folding computes into an anonymous ``onnx::Gemm_N`` weight.
    torchscript_fold = "an op computed at export"

    def site(self, index: GraphIndex, node: onnx.NodeProto) -> Site | str:
        if len(node.input) < 2 or not node.input[1]:
            return "has no weight input"
        weight = float_weight(index, node, WEIGHT_FIRST)
        if isinstance(weight, str):
            return weight
        shape = weight.node_shape
        if len(shape) != 2:
            return (
                f"weight {weight.initializer!r} has shape {list(shape)}; only 2-D weights take a dense branch"
            )
        if 0 in shape:
            return f"weight {weight.initializer!r} is empty (shape {list(shape)})"
        attrs = index.attributes(node)
        gemm = GemmAttrs(
            alpha=float(attrs.get("alpha", 1.0)),  # type: ignore[arg-type]
            beta=float(attrs.get("beta", 1.0)),  # type: ignore[arg-type]
            trans_a=int(attrs.get("transA", 0)),  # type: ignore[call-overload]
            trans_b=int(attrs.get("transB", 0)),  # type: ignore[call-overload]
        )
        in_f, out_f = (shape[1], shape[0]) if gemm.trans_b else shape
        layout = "out,in" if gemm.trans_b else "in,out"
        path = module_path(index, node, weight.initializer)
        return Site(
            node.name,
            self.op_type,
            path,
            node.input[0],
            node.output[0],
            weight,
            layout,
            in_f,
            out_f,
            gemm=gemm,
        )

    def torch_transposed(self, site: Site) -> bool:
        return self.source_layout(site) == "in,out"


GEMM = register(GemmKind())
