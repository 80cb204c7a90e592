"""Recover the PyTorch module path (``model.layers.0.self_attn.q_proj``) of an exported node.

Targets, rank patterns and PEFT adapter keys all name modules, so every site needs its module's path.
Exporters leave it in different places (see REFERENCE section 3); we read them in order of reliability:

1. dynamo: the node's ``pkg.torch.onnx.name_scopes`` metadata (the module scope the op ran in),
   except on nodes an optimizer fused (they carry the fused-in module's scope);
2. TorchScript: the node name's scope, ``/model/layers.0/self_attn/q_proj/MatMul``;
3. the weight: the ``pkg.onnxscript.optimizer.folded_from`` value_info metadata of a folded
   initializer, onnx-ir's ``Value.metadata_props`` (``val_76`` -> ``['model.fc.weight']``), or a
   parameter-style initializer name (``fc.weight``), minus the ``.weight`` suffix;
4. otherwise the weight's or the node's own name, so every site has a stable label.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping

import onnx_ir as ir

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"
REWRITE_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"

# Anonymous names exporters give folded or deduplicated tensors: onnx::MatMul_733, val_105, _v_12.
_ANONYMOUS = re.compile(r"^(onnx::.*|val_\d+|_v_\d+|.*::.*)$")
_PARAMETER_SUFFIXES = (".weight", ".qweight", ".weight_q", ".W")


def module_path(node: ir.Node, weight: ir.Value | str | None) -> str:
    """The module path of ``node`` whose weight initializer is ``weight`` (a value, or a name that carries
    no metadata, such as the float parameter a quantized tensor was named after)."""
    name = (weight if isinstance(weight, str) else weight.name) if weight is not None else None
    metadata = weight.metadata_props if isinstance(weight, ir.Value) else {}
    from_weight = _from_weight(name, metadata) if name else None
    # A node made by an optimizer fusion (e.g. FuseBatchNormIntoConv) carries the scope of the module
    # it was fused with (the BatchNorm); its weight still names the module that owns the parameter.
    if from_weight and REWRITE_RULE_KEY in node.metadata_props:
        return from_weight
    return (
        _from_name_scopes(node)
        or _from_scope_name(node.name or "")
        or from_weight
        or (name if name and not _ANONYMOUS.match(name) else None)
        or node.name
        or ""
    )


def _literal_list(raw: str | None) -> list[str]:
    """Metadata lists are Python-list strings: ``"['model.fc.weight']"``."""
    if not raw:
        return []
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def _from_name_scopes(node: ir.Node) -> str | None:
    """dynamo: a list of scopes, outermost first; the last names the op, the one before it the module."""
    scopes = _literal_list(node.metadata_props.get(NAME_SCOPES_KEY))
    if len(scopes) < 2:
        return None
    return scopes[-2].strip(".") or None


def _from_scope_name(name: str) -> str | None:
    """TorchScript: ``/a/b.0/c/MatMul`` -> ``a.b.0.c``; node names without a scope give None."""
    if not name.startswith("/"):
        return None
    parts = [part for part in name.split("/") if part]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def _from_weight(weight: str, metadata: Mapping[str, str]) -> str | None:
    """``fc`` from ``fc.weight``, or from a folded ``val_12`` whose metadata names ``['fc.weight']``."""
    folded = _literal_list(metadata.get(FOLDED_FROM_KEY))
    for candidate in (*folded, weight):
        if _ANONYMOUS.match(candidate):
            continue
        for suffix in _PARAMETER_SUFFIXES:
            if candidate.endswith(suffix):
                return candidate[: -len(suffix)]
    return None
