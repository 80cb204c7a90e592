"""``Gemm``: ``y = alpha * A' @ B' + beta * C`` with a constant B (transB=1 stores it (out, in), as
torch's Linear exports it). The branch computes in the node's orientation and carries the Gemm's alpha."""

from __future__ import annotations

import onnx_ir as ir

from lora_onnx.kinds.base import register
from lora_onnx.kinds.dense import DenseKind
from lora_onnx.kinds.matmul import dense_weight
from lora_onnx.kinds.site import GemmAttrs, Site
from lora_onnx.model.graph import attribute_values
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.values import name_of
from lora_onnx.model.weights import source_value


class GemmKind(DenseKind):
    op_type = "Gemm"
    key = "gemm"
    bias_input = True
    linear = True
    #: What TorchScript's constant folding computes into an anonymous ``onnx::Gemm_N`` weight.
    torchscript_fold = "an op computed at export"

    def site(self, node: ir.Node) -> Site | str:
        weight = dense_weight(node)
        if isinstance(weight, str):
            return weight
        shape = weight.node_shape
        attrs = attribute_values(node)
        gemm = GemmAttrs(
            alpha=float(attrs.get("alpha", 1.0)),  # type: ignore[arg-type]
            beta=float(attrs.get("beta", 1.0)),  # type: ignore[arg-type]
            trans_a=int(attrs.get("transA", 0)),  # type: ignore[call-overload]
            trans_b=int(attrs.get("transB", 0)),  # type: ignore[call-overload]
        )
        in_f, out_f = (shape[1], shape[0]) if gemm.trans_b else shape
        layout = "out,in" if gemm.trans_b else "in,out"
        path = module_path(node, source_value(node.inputs[1]))
        return Site(
            node.name,
            self.op_type,
            path,
            name_of(node.inputs[0]),
            name_of(node.outputs[0]),
            weight,
            layout,
            in_f,
            out_f,
            gemm=gemm,
        )


GEMM = register(GemmKind())
