"""onnxruntime's ``com.microsoft.MatMulNBits`` (4-bit and other block-quantized weights; op key
``matmulnbits``): a dense site with in = K, out = N from the node's attributes and the type of its scales.

The branch is the dense MatMul branch, joined after the node (its bias is inside it) or after a following
bias Add; folding into the packed weight lives with the quantized bases (:mod:`lora_onnx.sites.quantized`).
"""

from __future__ import annotations

import onnx_ir as ir

from lora_onnx.kinds.base import register
from lora_onnx.kinds.dense import DenseKind
from lora_onnx.kinds.matmul import join_after_bias
from lora_onnx.kinds.site import Site
from lora_onnx.model.dequantize import nbits_node
from lora_onnx.model.graph import attribute_values
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.values import constant_dtype, constant_shape, is_constant, name_of
from lora_onnx.model.weights import WeightRef

#: Suffixes onnxruntime's quantizers add to a weight's name (``fc.weight_Q4``, ``fc.weight_quantized``).
_QUANT_SUFFIXES = ("_DQ_Q4", "_DQ_Q8", "_Q2", "_Q4", "_Q8", "_quantized")


def parameter_name(weight: str) -> str:
    """``fc.weight`` from ``fc.weight_Q4``: the float parameter a quantizer named the tensor after."""
    for suffix in _QUANT_SUFFIXES:
        if weight.endswith(suffix):
            return weight[: -len(suffix)]
    return weight


def _nbits_site(node: ir.Node) -> Site | str:
    """A MatMulNBits node as a dense site (in = K, out = N), or the reason it cannot take a branch."""
    info = nbits_node(node)
    if isinstance(info, str):
        return info
    data = node.inputs[0]
    if is_constant(data):
        return "the data input is a constant"
    b, scales = node.inputs[1], node.inputs[2]
    assert b is not None and scales is not None
    weight = WeightRef(
        initializer=info.b,
        source_shape=constant_shape(b),
        source_dtype=constant_dtype(b),
        node_shape=(info.k, info.n),
        node_dtype=constant_dtype(scales),
    )
    parameter = parameter_name(info.b)
    path = module_path(node, b if parameter == info.b else parameter)
    output, bias_add = (name_of(node.outputs[0]), None) if info.bias else join_after_bias(node, info.n)
    return Site(
        node.name, "MatMulNBits", path, name_of(data), output, weight, "in,out", info.k, info.n,
        bias_add=bias_add,
    )  # fmt: skip


class MatMulNBitsKind(DenseKind):
    op_type = "MatMulNBits"
    key = "matmulnbits"
    domains = ("com.microsoft",)
    wants_data_rank = True
    bias_after = True
    packed_weight = True
    # PEFT adapters apply as float branches beside the packed weight; DoRA is refused (its norm needs the
    # float weight: peft_dora_norm), merging needs --dequantize (lora_onnx.sites.quantized).

    def peft_dora_norm(self, weight, a, b, scale, site):  # type: ignore[no-untyped-def]
        from lora_onnx.errors import AdapterError

        raise AdapterError(
            f"DoRA on MatMulNBits node {site.node!r} ({site.module_path}) needs the float weight's norm: "
            "apply the adapter to the float export, then quantize"
        )

    def site(self, node: ir.Node) -> Site | str:
        return _nbits_site(node)

    def output_width(self, node: ir.Node) -> int | None:
        n = attribute_values(node).get("N", 0)
        return int(n) or None  # type: ignore[call-overload]


MATMULNBITS = register(MatMulNBitsKind())
