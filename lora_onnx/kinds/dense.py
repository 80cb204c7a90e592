"""The dense branch form, ``y += s * (x @ A) @ B``, shared by MatMul, Gemm, MatMulNBits and Gather.

A is stored (in, r) and B (r, out), the MatMul layout onnxruntime's and Olive's adapters use; an
embedding (Gather) looks its A up as a (vocab, r) table. The fold's delta is ``s * A @ B`` in (in, out),
transposed for an (out, in) source weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_onnx.kinds.base import BranchForm, BranchNames, NodeMaker, OpKind, SiteForm, SitePair
from lora_onnx.kinds.deltas import DeltaRows, DenseRows, dense_delta
from lora_onnx.model.tensors import np_dtype

if TYPE_CHECKING:
    from lora_onnx.kinds.site import Site
    from lora_onnx.model.manifest import BranchRecord


class DenseForm(BranchForm):
    name = "dense"
    rank_axes = (1, 0)
    chain_op = "MatMul"

    def a_shape(self, site: Site, rank: int, a_group: int = 1) -> tuple[int, ...]:
        return (site.in_features, rank)

    def b_shape(self, site: Site, rank: int, b_group: int = 1) -> tuple[int, ...]:
        return (rank, site.out_features)

    def a_init(
        self, site: Site, rank: int, shape: tuple[int, ...], draw: Callable[..., np.ndarray]
    ) -> np.ndarray:
        # PEFT draws A in its own (r, in) layout; the dense store is (in, r), so draw then transpose.
        return draw((rank, site.in_features), site.in_features).T

    def b_fan_in(self, rank: int, b_group: int) -> int:
        return rank

    def build(
        self, make: NodeMaker, site: Site, data: str, a: str, b: str, names: BranchNames, a_op: str,
        a_group: int, b_group: int,
    ) -> None:  # fmt: skip
        if a_op == "Gather":  # an embedding's A is a (vocab, r) table looked up by the same ids: A[ids]
            make.node("Gather", [a, data], [names.a_out], names.a_node)
        else:
            make.node("MatMul", [data, a], [names.a_out], names.a_node)
        make.node("MatMul", [names.scaled, b], [names.b_out], names.b_node)

    def delta_rows(self, a: np.ndarray, b: np.ndarray, scale: float, record: BranchRecord) -> DeltaRows:
        return DenseRows(a, b, scale, record.source_layout)

    def expected_shapes(
        self, record: BranchRecord, weight: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The (A, B) shapes a branch needs for a source weight of shape ``weight`` (None: unknown layout)."""
        if len(weight) != 2 or record.source_layout not in ("in,out", "out,in"):
            return None
        in_f, out_f = weight if record.source_layout == "in,out" else weight[::-1]
        return (in_f, record.rank), (record.rank, out_f)

    def channel_factor_shape(self, source_layout: str, ndim: int) -> tuple[int, ...]:
        return (-1, 1) if source_layout == "out,in" else (1, -1)

    def pair_refusal(
        self, site: Site, a: np.ndarray, b: np.ndarray, a_group: int, b_group: int
    ) -> str | None:
        ok = (
            a.ndim == 2 and b.ndim == 2 and a.shape[0] == site.in_features and b.shape[1] == site.out_features
        )
        if ok and a.shape[1] == b.shape[0]:
            return None
        return f"A ({site.in_features}, r) and B (r, {site.out_features})"

    def fit_pair(
        self, site: Site, pair: SitePair, form: SiteForm, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        dtype = np_dtype(site.dtype)
        a, b = np.asarray(pair.a), np.asarray(pair.b)
        rank = a.shape[1]
        a = np.pad(a, [(0, 0), (0, form.rank - rank)])
        b = np.pad(b, [(0, form.rank - rank), (0, 0)])
        return a.astype(dtype, copy=False), b.astype(dtype, copy=False)

    def stack_dims(
        self, name_is_a: bool, shape: tuple[int, ...], rank: str, form: SiteForm
    ) -> list[int | str]:
        dims: list[int | str] = list(shape)
        dims[1 if name_is_a else 0] = rank
        return dims

    def build_mixed(self, builder: Any, item: Any, data: str, base: str, join: str, make: NodeMaker) -> None:
        site, stem = item.site, item.stem
        _, _, safe = builder.checked()
        a = builder.node(make, "Gather", [item.a_name, safe], f"{stem}.lora_A.rows", axis=0)
        b = builder.node(make, "Gather", [item.b_name, safe], f"{stem}.lora_B.rows", axis=0)

        def make_shape() -> str:
            width = builder.const("rows_width", np.array([-1, site.in_features], np.int64))
            return builder.node(
                builder.shared, "Concat", [builder.batch_shape(), width], f"{builder.index_name}.rows_shape",
                axis=0,
            )  # fmt: skip

        x = data
        if not item.batched:
            rows_shape = builder.shared_value(("rows", site.in_features), make_shape)
            x = builder.node(make, "Reshape", [data, rows_shape], f"{stem}.lora_input_rows")
        h = builder.node(make, "MatMul", [x, a], f"{stem}.lora_A.output")
        alpha = site.gemm.alpha if site.gemm else 1.0
        kept = builder.node(make, "Mul", [h, builder.keep(site.dtype, alpha)], f"{stem}.lora_kept")
        delta = builder.node(make, "MatMul", [kept, b], f"{stem}.lora_B.output")
        if not item.batched:
            shape = builder.node(make, "Shape", [base], f"{stem}.lora_output_shape")
            delta = builder.node(make, "Reshape", [delta, shape], f"{stem}.lora_delta")
        make.node("Add", [base, delta], [join], builder.name(f"{stem}.lora_add"))


DENSE = DenseForm()


class DenseKind(OpKind):
    """The shared base of the kinds that take the dense form (MatMul, Gemm, Gather, MatMulNBits)."""

    form = DENSE

    def torch_transposed(self, site: Site) -> bool:
        # A Linear's parameter is (out, in); a weight the node reads as (in, out) is it transposed.
        return self.linear and self.source_layout(site) == "in,out"

    def peft_dora_norm(
        self, weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, site: Site
    ) -> np.ndarray:
        # The weight viewed as (in, out) (vocab, dim for embeddings): PEFT's row norm of W + s * B @ A in
        # (out, in) is the norm over axis 0.
        in_out = weight.T if self.source_layout(site) == "out,in" else weight
        combined = in_out + dense_delta(a, b, scale)
        return np.sqrt(np.sum(np.square(combined), axis=0))
