"""Names and choices the command line builds its parsers from, in a module that imports nothing.

``lora-onnx --help`` and argument errors must not pay for onnx / onnxruntime / numpy: the library modules
that own these values (:mod:`~lora_onnx.sites.find`, :mod:`~lora_onnx.recipes.config`,
:mod:`~lora_onnx.proofs.inputs`, :mod:`~lora_onnx.adapters.files`) import them from here.
"""

from __future__ import annotations

#: op keys used by --ops, mapped to ONNX op types.
OP_KEYS = {
    "gemm": "Gemm",
    "matmul": "MatMul",
    "conv": "Conv",
    "convtranspose": "ConvTranspose",
    "matmulnbits": "MatMulNBits",
}
#: How fresh A/B matrices are initialised (--init).
INIT_KINDS = ("default", "gaussian", "random")
#: The adapter name when none is given (PEFT's).
DEFAULT_ADAPTER = "default"
#: The per-row adapter index input of mixed-batch models.
ADAPTER_INDEX = "lora_adapter_index"
#: Adapter file format name -> file suffix.
ADAPTER_FORMATS = {"onnx_adapter": ".onnx_adapter", "safetensors": ".safetensors", "npz": ".npz"}
