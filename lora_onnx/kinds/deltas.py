"""The delta ``s * B(A(.))`` of a LoRA branch as a weight, in its source weight's layout: the one home
of the fold's math.

A delta is described by its rows (leading axis): :meth:`DeltaRows.add_rows` adds rows ``r0:r1`` into a
caller's float32 buffer, which is how :mod:`lora_onnx.model.streaming` folds a GB-sized weight block by block;
:meth:`DeltaRows.array` runs the same code over every row at once for small weights and tests. Both
forms scale A once in float32 (``(s * A) @ B``), so a streamed fold and an in-memory one agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.streaming import FloatSource, RowFill, StreamedTensor, tensor_rows
from lora_onnx.model.tensors import np_dtype, shape_of


class DeltaRows:
    """Rows of a branch's delta; subclasses say how a block of rows is computed."""

    shape: tuple[int, ...]

    def add_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        """Add delta rows ``r0:r1`` to ``out`` (float32, ``(r1 - r0, *shape[1:])``); ``scratch`` is a flat
        float32 buffer of at least ``out.size`` elements that may be overwritten."""
        raise NotImplementedError

    def array(self) -> np.ndarray:
        """The whole delta (float32), computed by the same :meth:`add_rows` a streamed fold uses."""
        out = np.zeros(self.shape, np.float32)
        self.add_rows(0, self.shape[0], out, np.empty(out.size, np.float32))
        return out


class DenseRows(DeltaRows):
    """Rows of ``s * A @ B`` (layout ``in,out``) or of its transpose (layout ``out,in``), from MatMul-layout
    A (in, r) and B (r, out)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, scale: float, layout: str) -> None:
        a32 = np.asarray(a, np.float32) * np.float32(scale)
        b32 = np.asarray(b, np.float32)
        # Row block r0:r1 of delta (in, out) is A[r0:r1] @ B; of delta.T (out, in) it is B.T[r0:r1] @ A.T.
        if layout == "out,in":
            self.left, self.right = np.ascontiguousarray(b32.T), np.ascontiguousarray(a32.T)
        else:
            self.left, self.right = np.ascontiguousarray(a32), b32
        self.shape = (self.left.shape[0], self.right.shape[1])

    def add_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        product = scratch[: (r1 - r0) * self.right.shape[1]].reshape(r1 - r0, self.right.shape[1])
        np.matmul(self.left[r0:r1], self.right, out=product)
        out.reshape(r1 - r0, -1)[...] += product


class ConvRows(DeltaRows):
    """Rows (output channels) of the (out, in/group, k...) delta of ConvB(ConvA(x)), both convs split into
    ``group`` groups.

    Group j's output channels see only group j's rank channels, which see only group j's input channels,
    so the delta is one ``B_j @ A_j`` block per group, exactly a grouped weight's shape.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, scale: float, group: int) -> None:
        rank, out = a.shape[0], b.shape[0]
        self.a2 = np.asarray(a, np.float32).reshape(rank, -1) * np.float32(scale)
        self.b2 = np.asarray(b, np.float32).reshape(out, -1)
        self.rank_g, self.out_g, self.group = rank // group, out // group, group
        self.shape = (out, *a.shape[1:])

    def add_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        flat = out.reshape(r1 - r0, -1)
        cols = self.a2.shape[1]
        for j in range(r0 // self.out_g, (r1 - 1) // self.out_g + 1):
            lo, hi = max(r0, j * self.out_g), min(r1, (j + 1) * self.out_g)
            product = scratch[: (hi - lo) * cols].reshape(hi - lo, cols)
            np.matmul(self.b2[lo:hi], self.a2[j * self.rank_g : (j + 1) * self.rank_g], out=product)
            flat[lo - r0 : hi - r0] += product


def delta_rows(model: LoadedModel, branch: BranchRecord) -> DeltaRows:
    """The row form of ``branch``'s delta in its source weight's layout (its branch form's)."""
    from lora_onnx.kinds.base import form_of  # the forms build on this module's row classes

    return form_of(branch.kind).delta_rows(model.array(branch.a), model.array(branch.b), branch.scale, branch)


def dense_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``s * A @ B`` in (in, out) orientation, float32, from MatMul-layout A (in, r) and B (r, out)."""
    return DenseRows(a, b, scale, "in,out").array()


def conv_delta(a: np.ndarray, b: np.ndarray, scale: float, group: int) -> np.ndarray:
    """The grouped conv delta of :class:`ConvRows`, whole."""
    return ConvRows(a, b, scale, group).array()


def branch_delta(model: LoadedModel, branch: BranchRecord) -> np.ndarray:
    """The branch's delta in the layout of its source weight initializer (float32), whole."""
    return delta_rows(model, branch).array()


def folded_weight(
    model: LoadedModel,
    weight: str,
    branches: Sequence[BranchRecord],
    source: FloatSource | None = None,
    *,
    channel_scale: Callable[[int], np.ndarray] | None = None,
) -> StreamedTensor:
    """``weight + sum(s * delta)`` of ``branches``, computed in float32 and cast to the weight's type
    (or ``source``'s, which then provides the weight's float value), block by block.

    ``channel_scale(ndim)``, if given, returns a factor broadcastable against the whole weight (first
    axis 1, or the weight's first dimension) that multiplies the sum, e.g. DoRA's per-channel
    ``magnitude / norm``.
    """
    if source is None:
        tensor = model.initializer(weight)
        source = FloatSource(shape_of(tensor), np_dtype(tensor.data_type), lambda: tensor_rows(model, weight))
    opener, shape = source.open, source.shape

    def prepare() -> RowFill:
        rows = opener()
        deltas = [delta_rows(model, branch) for branch in branches]
        factor = None if channel_scale is None else np.asarray(channel_scale(len(shape)), np.float32)

        def fill(r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
            rows.read_rows(r0, r1, out, scratch)
            for delta in deltas:
                delta.add_rows(r0, r1, out, scratch)
            if factor is not None:
                out *= factor if factor.shape[0] == 1 else factor[r0:r1]

        return fill

    return StreamedTensor(shape, source.dtype, prepare)
