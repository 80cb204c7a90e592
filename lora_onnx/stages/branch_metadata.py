"""Branch nodes say where they come from: the base node's module scope and the branch they belong to.

The PyTorch exporter (dynamo) stamps every node with its module scope (``pkg.torch.onnx.name_scopes``,
``pkg.torch.onnx.class_hierarchy``, ``namespace``); viewers (Netron, model explorers) and profilers group
nodes by it. A branch node copies its base node's scope, so a LoRA branch shows inside the module it
adapts, plus :data:`BRANCH_KEY` naming its branch (``adapter@site node``). The base node's
``fx_node`` / ``stack_trace`` are not copied: they describe that node's own op, not the branch's. Nodes
shared by several branches (the adapter-index nodes of mixed batches) get the scope common to all the
branches they serve and the tag :data:`SHARED`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence

import onnx_ir as ir

from lora_onnx.model.graph import nodes_by_name
from lora_onnx.model.manifest import BranchRecord

#: Node metadata key: which branch a node belongs to (``adapter@site``), or :data:`SHARED`.
BRANCH_KEY = "lora_onnx.branch"
SHARED = "shared"
#: The exporter's scope keys copied from a base node to its branch nodes.
SCOPE_KEYS = ("namespace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes")
_LIST_KEYS = ("pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes")


def branch_tag(branch: BranchRecord) -> str:
    """The :data:`BRANCH_KEY` value of ``branch``'s nodes."""
    return f"{branch.adapter}@{branch.site}"


def scope_of(node: ir.Node) -> dict[str, str]:
    """The exporter scope metadata of ``node`` (empty for models from other exporters)."""
    return {key: value for key, value in node.metadata_props.items() if key in SCOPE_KEYS}


def stamp_branches(graph: ir.Graph, branches: Iterable[BranchRecord]) -> None:
    """Give every node of ``branches`` its base node's scope and its branch tag (in place)."""
    nodes = nodes_by_name(graph)
    for branch in branches:
        base = nodes.get(branch.site)
        values = {**(scope_of(base) if base is not None else {}), BRANCH_KEY: branch_tag(branch)}
        for name in branch.nodes:
            if name in nodes and name != branch.site:
                nodes[name].metadata_props.update(values)


def stamp_shared(graph: ir.Graph, names: Iterable[str], branches: Sequence[BranchRecord]) -> None:
    """Tag nodes shared by ``branches`` :data:`SHARED`, with the scope all their base nodes have in common
    (the innermost module holding every one of them)."""
    nodes = nodes_by_name(graph)
    scopes = [scope_of(nodes[b.site]) for b in branches if b.site in nodes]
    values = {**_common_scope(scopes), BRANCH_KEY: SHARED}
    for name in names:
        if name in nodes:
            nodes[name].metadata_props.update(values)


def _common_scope(scopes: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not scopes or any(not scope for scope in scopes):
        return {}
    lists = {}
    for key in _LIST_KEYS:
        parsed = [_as_list(scope.get(key)) for scope in scopes]
        if any(item is None for item in parsed):
            return {}
        lists[key] = parsed
    # The last entry of a node's scope lists is its own op (e.g. 'linear'), never a shared module.
    depth = min(len(item) - 1 for items in lists.values() for item in items)  # type: ignore[arg-type]
    while depth > 0 and any(len({tuple(i[:depth]) for i in items}) > 1 for items in lists.values()):  # type: ignore[index]
        depth -= 1
    common = {key: repr(items[0][:depth]) for key, items in lists.items()}  # type: ignore[index]
    namespaces = [scope.get("namespace", "").split("/") for scope in scopes]
    if all(len(parts) > depth for parts in namespaces):
        common["namespace"] = "/".join(namespaces[0][:depth])
    return common


def _as_list(value: str | None) -> list[str] | None:
    try:
        parsed = ast.literal_eval(value) if value is not None else None
    except (ValueError, SyntaxError):
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(i, str) for i in parsed) else None
