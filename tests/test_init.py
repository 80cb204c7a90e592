"""Initialisation follows PEFT: kaiming-uniform A (bound 1/sqrt(fan_in)), B zero; reproducible by seed."""

from __future__ import annotations

import numpy as np
from builders import make_model, rng_array
from onnx import TensorProto, helper

from lora_onnx import LoraConfig, find_sites
from lora_onnx.model.graph import FreshNames
from lora_onnx.model.load import load_model
from lora_onnx.recipes.init import initial_values
from lora_onnx.recipes.plan import plan_branches


def _plan(rank: int = 8, conv: bool = False):
    if conv:
        node, x, w = helper.make_node("Conv", ["x", "W"], ["y"], name="c"), [1, 16, 5, 5], (32, 16, 3, 3)
    else:
        node, x, w = helper.make_node("MatMul", ["x", "W"], ["y"], name="m"), [2, 256], (256, 128)
    model = load_model(make_model([node], {"x": (TensorProto.FLOAT, x)}, ["y"], {"W": rng_array(w)}))
    return plan_branches(find_sites(model), LoraConfig(rank=rank), FreshNames(model.ir_model.graph)).branches[
        0
    ]


def test_default_is_kaiming_uniform_a_and_zero_b() -> None:
    for conv, fan_in in ((False, 256), (True, 16 * 9)):
        a, b = initial_values(_plan(conv=conv), "default", 0)
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
        assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound and not b.any()


def test_gaussian_has_std_one_over_rank_and_random_fills_b() -> None:
    a, b = initial_values(_plan(rank=4), "gaussian", 0)
    assert abs(a.std() - 1 / 4) < 0.02 and not b.any()
    a, b = initial_values(_plan(rank=4), "random", 0)
    assert b.any() and np.abs(b).max() <= 1 / np.sqrt(4)


def test_same_seed_same_values_other_seed_other_values() -> None:
    plan = _plan()
    first, again, other = (initial_values(plan, "random", s) for s in (1, 1, 2))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
