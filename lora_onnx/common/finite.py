"""NaN and Inf are never a value a user meant: checks for adapter tensors and numeric options.

An adapter tensor with one NaN makes every output it touches NaN, and a proof comparing NaN with NaN
proves nothing, so adapter tensors are refused at load (naming the key and the file) and numeric options
(strengths, tolerances, alphas) must be finite. numpy only: the readers and the option parsers use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from lora_onnx.errors import AdapterError, LoraOnnxError


def nonfinite_count(value: np.ndarray) -> int:
    """How many elements of ``value`` are NaN or +-Inf (0 for integer, boolean and string arrays)."""
    array = np.asarray(value)
    # "V" covers ml_dtypes' bfloat16 / float8 types, whose isfinite works; plain void records have none.
    if array.dtype.kind not in "fcV" or array.size == 0:
        return 0
    try:
        finite = np.isfinite(array)
    except TypeError:
        return 0
    return int(array.size - np.count_nonzero(finite))


def describe_nonfinite(value: np.ndarray) -> str:
    """``"3 NaN/Inf values (first at index (0, 2): nan)"``, for messages about a non-finite array."""
    array = np.asarray(value)
    flags = ~np.isfinite(array)
    first = tuple(int(i) for i in np.argwhere(flags)[0])
    return f"{int(np.count_nonzero(flags))} NaN/Inf values (first at index {first}: {array[first]})"


def require_finite_tensors(tensors: Mapping[str, np.ndarray], source: str) -> None:
    """Raise :class:`AdapterError` naming the first tensor of ``tensors`` with a NaN or Inf."""
    for key, value in tensors.items():
        require_finite_tensor(value, key, source)


def require_finite_tensor(value: np.ndarray, key: str, source: str) -> None:
    """Raise :class:`AdapterError` when ``value`` (tensor ``key`` of ``source``) has a NaN or Inf."""
    if nonfinite_count(value):
        raise AdapterError(
            f"{source}: tensor {key!r} has {describe_nonfinite(value)}; an adapter's tensors must be "
            "finite (the training diverged, or the file is damaged)"
        )


def finite_number(value: object, what: str, *, positive: bool = False) -> float:
    """``value`` as a float when it is a finite number >= 0 (> 0 with ``positive``), else a one-line error.

    ``what`` names the option in the message (``--strength``, ``rtol for output 'y'``).
    """
    bound = "> 0" if positive else ">= 0"
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise LoraOnnxError(f"{what} must be a finite number {bound}, got {value!r}")
    return number


#: Seeds are numpy SeedSequence entropy: whole numbers 0 .. 2**32 - 1 (one 32-bit word, as in torch/numpy).
MAX_SEED = 2**32 - 1


def check_seed(seed: object, what: str = "--seed") -> int:
    """``seed`` when it is a whole number in 0 .. :data:`MAX_SEED`, else a one-line :class:`LoraOnnxError`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise LoraOnnxError(f"{what} must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)
