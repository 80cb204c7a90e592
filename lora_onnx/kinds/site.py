"""The records site finding produces: a :class:`Site` (a node that can take a branch), a :class:`Skipped`
node with its reason, and the :class:`SiteScan` holding both. Each op kind (:mod:`lora_onnx.kinds`) builds
them; everything downstream reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_onnx.model.weights import WeightRef


@dataclass(frozen=True)
class GemmAttrs:
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: int = 0
    trans_b: int = 0


@dataclass(frozen=True)
class ConvAttrs:
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    group: int
    #: ConvTranspose only: the extra output size per spatial axis, and an explicit output shape (or ()).
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Site:
    """A node that can take a branch ``y += s * B(A(x))``.

    ``output`` is the value the branch is added to: the node's own output, or, for a MatMul on a 2-D input
    followed by its bias Add (``bias_add``), that Add's output, so onnxruntime can still fuse MatMul +
    bias into a Gemm (for N-d inputs the branch joins before the bias Add). ``layout`` describes the
    weight as the node sees it: ``in,out`` (MatMul, Gemm transB=0), ``out,in`` (Gemm transB=1),
    ``out,in/group,k...`` (Conv), ``in,out/group,k...`` (ConvTranspose) or ``vocab,dim`` (Gather:
    ``in_features`` is the vocabulary, the data input the indices).
    """

    node: str
    op: str
    module_path: str
    data_input: str
    output: str
    weight: WeightRef
    layout: str
    in_features: int
    out_features: int
    gemm: GemmAttrs | None = None
    conv: ConvAttrs | None = None
    bias_add: str | None = None

    @property
    def dtype(self) -> int:
        """The element type the node computes in; LoRA tensors take it."""
        return self.weight.node_dtype

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.conv.kernel_shape if self.conv else ()

    @property
    def group(self) -> int:
        return self.conv.group if self.conv else 1

    @property
    def weight_params(self) -> int:
        count = 1
        for dim in self.weight.source_shape:
            count *= dim
        return count


@dataclass(frozen=True)
class Skipped:
    """A node of a supported op type that cannot take a branch, and why."""

    node: str
    op: str
    module_path: str
    reason: str


@dataclass(frozen=True)
class SiteScan:
    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]
