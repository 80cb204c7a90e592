"""The one nearest-name helper and the one PEFT target matcher, as every caller sees them."""

from __future__ import annotations

import pytest

from lora_onnx.common.names import nearest
from lora_onnx.recipes import files as recipes
from lora_onnx.sites.targets import PeftTargetSelector, TargetSelector, module_matches

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]


def test_plain_names_use_the_cutoff() -> None:
    assert nearest("rnak", ["rank", "alpha", "dims"], n=1) == ["rank"]
    assert nearest("zzzz", ["rank", "alpha"], n=1) == []


def test_dotted_paths_prefer_the_same_last_component_then_close_ones() -> None:
    # same tail: the path closest to the whole name (layer 1) first
    assert nearest("model.layers.1.self_attn.k_proj", PATHS, dotted=True)[0] == PATHS[1]
    assert nearest("model.layers.1.self_attn.q_proj.x", [*PATHS, "a.x"], dotted=True) == ["a.x"]
    # a typo of the last component: one path per close tail, nearest the whole name
    assert nearest("q_prj", PATHS, dotted=True) == [PATHS[0], PATHS[2]]
    # nothing close at all still names some paths, never an empty hint
    assert nearest("?", PATHS, dotted=True) == PATHS[:3]
    assert nearest("x", [], dotted=True) == []


@pytest.mark.parametrize(
    ("path", "names", "regex", "expected"),
    [
        ("model.q_proj", ("q_proj",), None, True),
        ("model.xq_proj", ("q_proj",), None, False),  # a suffix must start after a dot
        ("q_proj", ("q_proj",), None, True),
        ("model.q_proj", (), r".*q_proj", True),
        ("model.q_proj.lora", (), r".*q_proj", False),  # a regex must match the whole path
    ],
)
def test_module_matches_is_peft_rule(
    path: str, names: tuple[str, ...], regex: str | None, expected: bool
) -> None:
    assert module_matches(path, names, regex) is expected


def test_selectors_share_the_exclude_rule_and_recipes_use_the_same_class() -> None:
    assert recipes.PeftTargetSelector is PeftTargetSelector
    plain = TargetSelector(names=("q_proj",), exclude_regex=r"model\.layers\.1\..*")
    peft = PeftTargetSelector(names=("q_proj",), exclude_regex=r"model\.layers\.1\..*", layers=(0, 1))
    for selector in (plain, peft):
        assert [selector.selects(p) for p in PATHS] == [True, False, False]
    assert not PeftTargetSelector(names=("q_proj",), layers=(1,)).selects(PATHS[0])
