"""lora_onnx.kinds: one plug-in per op kind, and nothing else asks what op a node or a branch is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_onnx.common.constants import OP_KEYS
from lora_onnx.errors import LoraOnnxError
from lora_onnx.kinds import all_kinds, form_of, kind_of

PACKAGE = Path(__file__).resolve().parent.parent / "lora_onnx"
SITE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "MatMulNBits")


def test_every_kind_is_registered_once_with_its_form() -> None:
    kinds = all_kinds()
    assert sorted(k.op_type for k in kinds) == sorted(SITE_OPS)
    assert {k.form.name for k in kinds} == {"dense", "conv", "conv_transpose"}
    for kind in kinds:
        assert kind_of(kind.op_type) is kind and form_of(kind.form.name) is kind.form


def test_the_parsers_op_keys_are_the_fresh_kinds_keys() -> None:
    """--ops is parsed without importing the kinds (start-up); both lists must agree."""
    fresh = {kind.key: kind.op_type for kind in all_kinds() if kind.key != "gather"}
    assert fresh == OP_KEYS


def test_unknown_kinds_and_forms_are_errors_naming_what_is_known() -> None:
    with pytest.raises(LoraOnnxError, match=r"no op kind 'Einsum'.*MatMul"):
        kind_of("Einsum")
    with pytest.raises(LoraOnnxError, match=r"no branch form 'lokr'.*dense"):
        form_of("lokr")


def test_no_module_outside_the_kinds_tests_a_site_op_type() -> None:
    """The op kinds' knowledge lives in lora_onnx/kinds: no other module compares an op (a node's
    op_type, a site's or a record's op, a branch's form) with one of the site op types or forms."""
    names = "|".join([*SITE_OPS, "dense", "conv", "conv_transpose"])
    compare = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        if "kinds" not in path.relative_to(PACKAGE).parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if compare.search(line)
    ]
    assert offenders == []
