"""Initial values of fresh LoRA tensors, as PEFT initialises them.

Each tensor draws from its own generator seeded by (seed, tensor name), so a tensor's values do not
depend on which other sites are targeted, and a run is reproducible from ``--seed``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from lora_onnx.model.tensors import np_dtype
from lora_onnx.recipes.plan import BranchPlan


def _generator(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    # torch's kaiming_uniform_(a=sqrt(5)), PEFT's default for A: bound = gain * sqrt(3 / fan_in) with
    # gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), which simplifies to 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def initial_value(plan: BranchPlan, tensor: str, init: str, seed: int) -> np.ndarray:
    """A (``tensor="A"``) or B in the plan's stored layout and the site's dtype."""
    rank = plan.rank
    dtype = np_dtype(plan.site.dtype)
    if tensor == "A":
        rng = _generator(seed, plan.a_name)
        if init == "gaussian":
            value = rng.standard_normal(plan.a_shape) / rank
        else:  # each form draws in PEFT's layout with its fan-in (lora_onnx.kinds)
            value = plan.form.a_init(
                plan.site, rank, plan.a_shape, lambda s, fan: _kaiming_uniform(rng, s, fan)
            )
    elif init == "random":
        fan_in = plan.form.b_fan_in(rank, plan.b_group)
        value = _kaiming_uniform(_generator(seed, plan.b_name), plan.b_shape, fan_in)
    else:
        value = np.zeros(plan.b_shape, np.float32)
    return np.ascontiguousarray(value, dtype=dtype)


def initial_values(plan: BranchPlan, init: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A and B in the plan's stored layouts and the site's dtype."""
    return initial_value(plan, "A", init, seed), initial_value(plan, "B", init, seed)
