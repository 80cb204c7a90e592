"""Initial values of fresh LoRA tensors, as PEFT initialises them.

Each tensor draws from its own generator seeded by (seed, tensor name), so a tensor's values do not
depend on which other sites are targeted, and a run is reproducible from ``--seed``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from lora_onnx.plan import BranchPlan
from lora_onnx.tensors import np_dtype


def _generator(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    # torch's kaiming_uniform_(a=sqrt(5)), PEFT's default for A: bound = gain * sqrt(3 / fan_in) with
    # gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), which simplifies to 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def initial_values(plan: BranchPlan, init: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A and B in the plan's stored layouts and the site's dtype."""
    rng_a = _generator(seed, plan.a_name)
    rank = plan.rank
    if plan.kind == "dense":
        fan_in_a = plan.site.in_features
        fan_in_b = rank
    else:
        fan_in_a = math.prod(plan.a_shape[1:])
        fan_in_b = rank // plan.b_group
    if init == "gaussian":
        a = (rng_a.standard_normal(plan.a_shape) / rank).astype(np.float32)
    else:
        # PEFT draws A in its own (r, in) layout; the dense store is (in, r), so draw then transpose.
        shape = (rank, plan.site.in_features) if plan.kind == "dense" else plan.a_shape
        a = _kaiming_uniform(rng_a, shape, fan_in_a)
        a = a.T if plan.kind == "dense" else a
    if init == "random":
        b = _kaiming_uniform(_generator(seed, plan.b_name), plan.b_shape, fan_in_b)
    else:
        b = np.zeros(plan.b_shape, np.float32)
    dtype = np_dtype(plan.site.dtype)
    return np.ascontiguousarray(a, dtype=dtype), np.ascontiguousarray(b, dtype=dtype)
