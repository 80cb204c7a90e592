"""lora_onnx.kinds.deltas: one delta implementation, whole (in-memory folds) and in row blocks (streamed)."""

from __future__ import annotations

import numpy as np
import pytest

from lora_onnx.kinds.deltas import ConvRows, DenseRows, conv_delta, dense_delta


@pytest.mark.parametrize("layout", ["in,out", "out,in"])
def test_dense_rows_are_s_a_b_in_the_weight_layout(layout: str) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    expected = 0.25 * (a.astype(np.float64) @ b)
    expected = expected.T if layout == "out,in" else expected
    whole = DenseRows(a, b, 0.25, layout).array()
    assert whole.shape == expected.shape and whole.dtype == np.float32
    assert np.allclose(whole, expected, rtol=1e-6, atol=1e-6)


def _by_blocks(rows: DenseRows | ConvRows, step: int) -> np.ndarray:
    """The delta assembled from blocks of ``step`` rows added onto ones, as a streamed fold does."""
    out = np.ones(rows.shape, np.float32)
    scratch = np.empty(out.size, np.float32)
    for r0 in range(0, rows.shape[0], step):
        r1 = min(rows.shape[0], r0 + step)
        rows.add_rows(r0, r1, out[r0:r1], scratch)
    return out - 1


@pytest.mark.parametrize("step", [1, 2, 4, 7])
def test_row_blocks_add_up_to_the_whole_delta(step: int) -> None:
    rng = np.random.default_rng(2)
    # 6 output channels in 3 groups of 2: blocks of 4 or 7 rows straddle group boundaries.
    conv = ConvRows(rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((6, 1, 1, 1)), 0.5, group=3)
    dense = DenseRows(rng.standard_normal((9, 2)), rng.standard_normal((2, 4)), 2.0, "out,in")
    for rows in (conv, dense):
        assert np.allclose(_by_blocks(rows, step), rows.array(), rtol=1e-6, atol=1e-6)


def test_functional_forms_are_the_row_forms() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 2)), rng.standard_normal((2, 3))
    assert np.array_equal(dense_delta(a, b, 0.5), DenseRows(a, b, 0.5, "in,out").array())
    ca, cb = rng.standard_normal((2, 3, 1, 1)), rng.standard_normal((4, 2, 1, 1))
    assert np.array_equal(conv_delta(ca, cb, 1.5, 1), ConvRows(ca, cb, 1.5, 1).array())
    assert conv_delta(ca, cb, 1.5, 1).shape == (4, 3, 1, 1)
