"""Recipe files: native TOML / JSON options, PEFT adapter_config.json as a fresh-adapter recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import MODELS

from lora_onnx import inspect_model
from lora_onnx.recipes.files import PeftTargetSelector, RecipeError, build_config, load_recipe, recipe_digest
from lora_onnx.sites.targets import TargetSelector


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_native_toml_maps_every_option(tmp_path: Path) -> None:
    file = write(
        tmp_path / "recipe.toml",
        """
rank = 4
alpha = 8
rslora = true
target = ["query", "value"]
exclude-regex = ".*layer\\\\.1\\\\..*"
rank_pattern = { "value" = 2 }
alpha_pattern = { "query" = 3.5 }
ops = "gemm,matmul"
init = "random"
seed = 7
name = "style"
validate = true
merge = true
providers = ["cpu"]
dims = { batch = 3 }
""",
    )
    recipe = load_recipe(file)
    assert recipe.kind == "native"
    config = build_config(recipe.options)
    assert (config.rank, config.alpha, config.use_rslora) == (4, 8.0, True)
    assert config.targets == TargetSelector(names=("query", "value"), exclude_regex=r".*layer\.1\..*")
    assert dict(config.rank_pattern) == {"value": 2} and dict(config.alpha_pattern) == {"query": 3.5}
    assert config.ops == frozenset({"gemm", "matmul"})
    assert (config.init, config.seed, config.adapter_name) == ("random", 7, "style")
    assert recipe.options["validate"] is True and recipe.options["merge"] is True
    assert recipe.options["dims"] == {"batch": 3}
    # the recipe means on a real model what the same flags mean
    inspection = inspect_model(MODELS / "tiny_bert" / "model.onnx", config)
    paths = {row.module_path for row in inspection.sites}
    assert paths and all(p.endswith((".query", ".value")) and ".layer.1." not in p for p in paths)
    assert {row.rank for row in inspection.sites if row.module_path.endswith(".value")} == {2}


def test_json_recipe_equals_toml_recipe(tmp_path: Path) -> None:
    toml = write(tmp_path / "r.toml", 'rank = 2\ntarget = ["fc1"]\ninit = "gaussian"\n')
    js = write(tmp_path / "r.json", json.dumps({"rank": 2, "target": ["fc1"], "init": "gaussian"}))
    assert load_recipe(toml).options == load_recipe(js).options
    assert build_config(load_recipe(toml).options) == build_config(load_recipe(js).options)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rnak = 4\n", "unknown key 'rnak' (did you mean 'rank'?)"),
        ('rank = "4"\n', "key 'rank' must be a whole number, got '4'"),
        ("rank = true\n", "key 'rank' must be a whole number, got True"),
        ('target = "q_proj"\n', "key 'target' must be a list of module names"),
        ("target = [1]\n", "key 'target' must list module names, got 1"),
        (
            'ops = ["gemm", "lstm"]\n',
            "key 'ops' takes gemm, matmul, conv, convtranspose, matmulnbits; got 'lstm'",
        ),
        ('rank_pattern = { "q" = "big" }\n', "rank_pattern['q'] must be a number"),
        ("dims = { batch = 0 }\n", "dims['batch'] must be a positive whole number"),
        ("rank = [\n", "not valid TOML"),
    ],
)
def test_native_recipe_errors_name_the_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    file = write(tmp_path / "bad.toml", text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(file)
    message = str(caught.value)
    assert needle in message and str(file) in message and "\n" not in message


def test_missing_and_malformed_json_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.toml")
    bad = write(tmp_path / "bad.json", '{"rank": 4,}')
    with pytest.raises(RecipeError, match=r"not valid JSON \(line 1"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="a table of options"):
        load_recipe(write(tmp_path / "list.json", "[1, 2]"))


def test_values_are_checked_by_the_config(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.toml", 'init = "pissa"\n'))
    with pytest.raises(Exception, match="--init must be one of"):
        build_config(recipe.options)


def peft_config_json(tmp_path: Path, **fields: object) -> Path:
    base = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["query", "value"],
        "lora_dropout": 0.05,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": "tiny-bert",
    }
    base.update(fields)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(base))
    return path


def test_peft_config_is_a_recipe_for_a_fresh_adapter(tmp_path: Path) -> None:
    file = peft_config_json(
        tmp_path, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"value": 2}, alpha_pattern={"query": 5}
    )
    recipe = load_recipe(file)
    assert recipe.kind == "peft"
    config = build_config(recipe.options)
    assert (config.rank, config.alpha, config.use_rslora, config.init) == (4, 8.0, True, "default")
    assert config.targets.names == ("query", "value")
    inspection = inspect_model(MODELS / "tiny_bert" / "model.onnx", config)
    ranks = {row.module_path.rsplit(".", 1)[-1]: row.rank for row in inspection.sites}
    assert ranks == {"query": 4, "value": 2}


def test_peft_regex_target_exclude_and_init(tmp_path: Path) -> None:
    file = peft_config_json(
        tmp_path,
        target_modules=r".*\.(query|key)",
        exclude_modules=[r"key"],
        init_lora_weights=False,
    )
    config = build_config(load_recipe(file).options)
    assert config.targets.regex == r".*\.(query|key)" and config.targets.exclude == ("key",)
    assert config.init == "random"
    inspection = inspect_model(MODELS / "tiny_bert" / "model.onnx", config)
    assert {row.module_path.rsplit(".", 1)[-1] for row in inspection.sites} == {"query"}


def test_peft_all_linear_leaves_out_the_output_layer(tmp_path: Path) -> None:
    recipe = load_recipe(peft_config_json(tmp_path, target_modules="all-linear", task_type="CAUSAL_LM"))
    config = build_config(recipe.options)
    assert config.ops == frozenset({"gemm", "matmul"}) and "lm_head" in config.targets.exclude
    assert recipe.notes and "all-linear" in recipe.notes[0]
    inspection = inspect_model(MODELS / "tiny_llama" / "model.onnx", config)
    paths = {row.module_path for row in inspection.sites}
    assert paths and "lm_head" not in paths and all(row.op != "Conv" for row in inspection.sites)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"use_dora": True}, "key 'use_dora' = True: DoRA is not supported"),
        ({"lora_bias": True}, "key 'lora_bias'"),
        ({"init_lora_weights": "pissa"}, "key 'init_lora_weights' = 'pissa'"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not LoRA"),
        ({"target_modules": None}, "key 'target_modules' is null"),
        ({"r": "8"}, "key 'r' must be a whole number"),
        ({"exclude_modules": 3}, "key 'exclude_modules' must be a list or a regex string"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "layers_to_transform filters listed target"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ],
)
def test_peft_config_refusals_name_the_key(tmp_path: Path, fields: dict, needle: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(peft_config_json(tmp_path, **fields))
    assert needle in str(caught.value) and "adapter_config.json" in str(caught.value)


def test_layer_filter_and_modules_to_save_match_peft(tmp_path: Path) -> None:
    """Our selector gives PEFT's own answer (check_target_module_exists) for every path and config."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    paths = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.experts.0.q_proj",
        "model.layers.12.self_attn.v_proj",
        "transformer.h.1.attn.q_proj",
        "q_proj",
        "layers.1.q_proj",
        "score.q_proj",
        "score",
        "model.layers.1.self_attn.k_proj",
    ]
    configs = [
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": [0, 12], "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "layers_to_transform": 1, "layers_pattern": ["h", "layers"]},
        {"target_modules": ["q_proj", "score"], "modules_to_save": ["score"]},
        {"target_modules": r".*\.q_proj"},
        {"target_modules": ["q_proj"], "exclude_modules": ["experts.0.q_proj"], "layers_to_transform": [1]},
    ]
    for fields in configs:
        peft_config = PeftLoraConfig(**fields)
        recipe = load_recipe(peft_config_json(tmp_path, **fields))
        selector = build_config(recipe.options).targets
        for path in paths:
            expected = bool(check_target_module_exists(peft_config, path))
            assert selector.selects(path) == expected, (fields, path)


def test_native_layer_filter_without_targets(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.toml", "layers_to_transform = [1]\nlayers_pattern = 'layers'\n"))
    selector = build_config(recipe.options).targets
    assert isinstance(selector, PeftTargetSelector)
    assert selector.selects("model.layers.1.mlp.up_proj")
    assert not selector.selects("model.layers.0.mlp.up_proj") and not selector.selects("lm_head")
    inspection = inspect_model(MODELS / "tiny_llama" / "model.onnx", build_config(recipe.options))
    assert inspection.sites and all(".layers.1." in row.module_path for row in inspection.sites)


def test_peft_recipe_file_paths_resolve_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    recipe = load_recipe(write(folder / "r.toml", 'peft = "../adapters/a"\n'))
    assert recipe.options["peft"] == str((tmp_path / "adapters" / "a").resolve())


def test_digest_is_stable_and_order_free() -> None:
    assert recipe_digest({"rank": 4, "target": ["a"]}) == recipe_digest({"target": ["a"], "rank": 4})
    assert recipe_digest({"rank": 4}) != recipe_digest({"rank": 8})


def test_a_layer_filter_that_selects_nothing_is_an_error(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.toml", "layers_to_transform = [7]\n"))
    with pytest.raises(Exception, match="no site matches the targets") as caught:
        inspect_model(MODELS / "tiny_llama" / "model.onnx", build_config(recipe.options))
    assert "in layers [7]" in str(caught.value)
