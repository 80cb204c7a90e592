"""PEFT's selection semantics: list names, full-match regex, excludes, rank / alpha patterns."""

from __future__ import annotations

import pytest

from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.errors import LoraOnnxError, TargetError
from lora_onnx.sites.targets import name_matches, pattern_value


def test_list_matching_is_equal_or_dotted_suffix() -> None:
    assert name_matches("model.layers.0.q_proj", ["q_proj"])
    assert name_matches("q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.my_q_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])


def test_regex_must_match_the_whole_path_and_excludes_win() -> None:
    selector = TargetSelector(regex=r".*\.(q|v)_proj", exclude=("layers.1.v_proj",))
    assert selector.selects("model.layers.0.q_proj")
    assert not selector.selects("model.layers.0.q_proj.extra")
    assert not selector.selects("model.layers.1.v_proj")
    assert TargetSelector().selects("anything")
    assert not TargetSelector(exclude_regex=r"lm_.*").selects("lm_head")


def test_patterns_take_the_first_key_that_ends_the_path() -> None:
    patterns = {"q_proj": 16, r"layers\.0\..*": 4}
    assert pattern_value("model.layers.0.q_proj", patterns, 8) == 16
    assert pattern_value("model.layers.0.k_proj", patterns, 8) == 4
    assert pattern_value("model.layers.1.k_proj", patterns, 8) == 8
    assert pattern_value("model.layers.0.my_q_proj", {"q_proj": 16}, 8) == 8


def test_alpha_defaults_to_each_sites_rank() -> None:
    config = LoraConfig(rank=4, rank_pattern={"v": 16})
    assert config.alpha_for("a.v") == 16 and config.scale(16, config.alpha_for("a.v")) == 1
    assert config.scale(4, 8) == 2 and LoraConfig(use_rslora=True).scale(4, 8) == pytest.approx(4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "--rank must be a positive whole number"),
        ({"alpha": -1.0}, "--alpha must be a positive number"),
        ({"ops": frozenset({"lstm"})}, "--ops takes"),
        ({"init": "pissa"}, "--init must be one of"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"adapter_name": "a b"}, "adapter name"),
    ],
)
def test_bad_recipes_are_rejected_with_a_clear_message(kwargs, message) -> None:
    with pytest.raises(LoraOnnxError, match=message):
        LoraConfig(**kwargs)
    with pytest.raises(TargetError, match="--target-regex"):
        TargetSelector(regex="[")
