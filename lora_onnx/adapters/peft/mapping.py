"""Map adapter keys to graph sites by module path.

A key is ``[base_model.model.]<module path>.<role>``: roles are ``lora_A.weight``, ``lora_B.weight``,
``lora_B.bias``, ``lora_embedding_A``, ``lora_embedding_B`` and ``lora_magnitude_vector``. The module path
is matched against the sites' module paths:

1. equal paths;
2. else graph paths ending in ``"." + path`` (the export's root wraps the model PEFT wrapped: PEFT on
   ``LlamaModel``, export of ``LlamaForCausalLM``); several such paths are ambiguous, an error naming them;
3. else the longest graph path the adapter path ends with (``"." + graph path``: PEFT wrapped the task
   model, the export is the inner model, as Optimum exports some).

Every node with the matched path gets the branch (a module that runs more than once has several). An
adapter module that matches nothing is an error listing the nearest paths and every such module (or, with
``skip_unmatched``, left out: the export pruned it); one the graph has on a node that cannot take a branch
is an error naming the node and why; two adapter modules on one graph path are an error too.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from lora_onnx.common.names import nearest
from lora_onnx.errors import AdapterError
from lora_onnx.kinds import all_kinds
from lora_onnx.sites.find import Site, SiteScan, Skipped
from lora_onnx.sites.targets import name_matches

PEFT_PREFIX = "base_model.model."

_KEY = re.compile(
    r"^(?P<path>.+?)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
#: (role, param) -> the role name used here; anything else is not a LoRA tensor.
_ROLES = {
    ("lora_A", "weight"): "lora_A",
    ("lora_B", "weight"): "lora_B",
    ("lora_B", "bias"): "lora_B.bias",
    ("lora_embedding_A", None): "lora_embedding_A",
    ("lora_embedding_B", None): "lora_embedding_B",
    ("lora_magnitude_vector", None): "lora_magnitude_vector",
    ("lora_magnitude_vector", "weight"): "lora_magnitude_vector",
}
LINEAR_ROLES = frozenset({"lora_A", "lora_B", "lora_B.bias"})
EMBEDDING_ROLES = frozenset({"lora_embedding_A", "lora_embedding_B"})


def kind_ops() -> dict[str, tuple[str, ...]]:
    """Op types each kind of adapter module (``lora``, ``embedding``) can sit on, as the op kinds say."""
    found: dict[str, tuple[str, ...]] = {"lora": (), "embedding": ()}
    for kind in all_kinds():
        if kind.peft_role:
            found[kind.peft_role] = (*found.get(kind.peft_role, ()), kind.op_type)
    return found


#: Buffers some LoRA variants save that do not take part in inference.
_IGNORED_SUFFIXES = (".lora_velora_embed",)


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: its path as the adapter names it, and its keys by role.

    ``base_weight`` is the key of a saved copy of the base weight (PEFT saves embedding and lm_head
    weights when they are targeted); it is only checked for its shape.
    """

    path: str
    keys: Mapping[str, str] = field(default_factory=dict)
    base_weight: str | None = None
    #: A pipeline component's prefix (``"unet."``) removed from ``path`` for the component's own model;
    #: the config's rank / alpha patterns still see :attr:`full_path`.
    prefix: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @property
    def full_path(self) -> str:
        return self.prefix + self.path

    @property
    def kind(self) -> str:
        return "embedding" if EMBEDDING_ROLES & set(self.keys) else "lora"

    def key(self, role: str) -> str:
        return self.keys[role]


@dataclass(frozen=True)
class ModuleMatch:
    """An adapter module and the sites (one per node) of the graph module path it matched."""

    module: AdapterModule
    graph_path: str
    sites: tuple[Site, ...]


def strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def parse_keys(
    keys: Iterable[str],
    *,
    modules_to_save: Sequence[str] = (),
    source: str = "",
    saved: list[str] | None = None,
) -> list[AdapterModule]:
    """Group adapter keys into modules; a key that is not a LoRA tensor is an error naming it.

    ``saved``, when given, collects the keys of ``modules_to_save`` copies instead of refusing them
    (:mod:`lora_onnx.adapters.peft.modules_to_save` applies them).
    """
    from lora_onnx.adapters.peft.modules_to_save import is_saved_key

    roles: dict[str, dict[str, str]] = defaultdict(dict)
    base_weights: dict[str, str] = {}
    for key in keys:
        name = strip_prefix(key)
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if saved is not None and is_saved_key(name, modules_to_save):
            saved.append(key)
            continue
        if name.endswith(".base_layer.weight"):
            base_weights[name.removesuffix(".base_layer.weight")] = key
            continue
        match = _KEY.match(name)
        role = _ROLES.get((match["role"], match["param"])) if match else None
        if match is None or role is None:
            raise AdapterError(_unknown_key(source, key, name, modules_to_save))
        if role in roles[match["path"]]:
            raise AdapterError(
                f"{source}: keys {roles[match['path']][role]!r} and {key!r} are the same tensor"
            )
        roles[match["path"]][role] = key
    modules = []
    for path, found in roles.items():
        module = AdapterModule(path, found, base_weights.pop(path, None))
        _check_roles(source, module)
        modules.append(module)
    for path, key in base_weights.items():
        raise AdapterError(
            f"{source}: key {key!r} saves the base weight of {path!r}, which has no LoRA tensors"
        )
    if not modules:
        raise AdapterError(f"{source} holds no LoRA tensors (lora_A / lora_B / lora_embedding_A / _B)")
    return modules


def _unknown_key(source: str, key: str, name: str, modules_to_save: Sequence[str]) -> str:
    module = name.split(".modules_to_save.")[0] if ".modules_to_save." in name else name.rsplit(".", 1)[0]
    if ".modules_to_save." in name or (modules_to_save and name_matches(module, modules_to_save)):
        return (
            f"{source}: key {key!r} is a modules_to_save copy of module {module!r} (a whole retrained "
            "module, not a LoRA branch), which has no run-time slot or mixed-batch form; apply the adapter "
            "as constant branches (inject --peft, with or without --merge), or merge it in PyTorch "
            "(merge_and_unload) and export that"
        )
    if ".trainable_tokens_" in name:
        return f"{source}: key {key!r} holds trainable tokens (rows replacing embedding rows), not LoRA"
    if name.endswith((".weight", ".bias")):
        return (
            f"{source}: key {key!r} is a plain parameter of the base model (saved by "
            "bias='all'/'lora_only' or modules_to_save), not a LoRA tensor; merge in PyTorch and export "
            "the merged model"
        )
    return f"{source}: key {key!r} is not a LoRA tensor (expected lora_A/B, lora_embedding_A/B, magnitude)"


def _check_roles(source: str, module: AdapterModule) -> None:
    roles = set(module.keys)
    if roles & LINEAR_ROLES and roles & EMBEDDING_ROLES:
        raise AdapterError(f"{source}: module {module.path!r} has both lora_A/B and lora_embedding_A/B keys")
    pair = ("lora_embedding_A", "lora_embedding_B") if module.kind == "embedding" else ("lora_A", "lora_B")
    missing = [role for role in pair if role not in roles]
    if missing:
        raise AdapterError(
            f"{source}: module {module.path!r} has no {missing[0]} key (it has {sorted(roles)})"
        )


def site_paths(scan: SiteScan) -> dict[str, dict[str, list[Site]]]:
    """kind ("lora", "embedding") -> graph module path -> its sites."""
    roles = kind_ops()
    by_kind: dict[str, dict[str, list[Site]]] = {kind: defaultdict(list) for kind in roles}
    for site in scan.sites:
        for kind, ops in roles.items():
            if site.op in ops:
                by_kind[kind][site.module_path].append(site)
    return by_kind


def match_modules(
    modules: Sequence[AdapterModule], scan: SiteScan, *, source: str = "", skip_unmatched: bool = False
) -> list[ModuleMatch]:
    """The sites of every adapter module (see the module doc for the rule and the errors).

    A module whose path matches no graph module at all (the export left it out: BERT's pooler when only
    ``last_hidden_state`` is exported) is an error listing every such key, unless ``skip_unmatched``:
    then it is left out (:func:`unmatched_modules` says which). A module the graph has but cannot adapt
    is an error either way.
    """
    by_kind = site_paths(scan)
    matches: list[ModuleMatch] = []
    owner: dict[str, str] = {}
    unmatched: list[AdapterModule] = []
    for module in modules:
        paths = by_kind[module.kind]
        found = match_path(module, list(paths), source)
        if found is None:
            reason = unadaptable(module, scan, source)
            if reason is not None:
                raise AdapterError(reason)
            unmatched.append(module)
            continue
        graph_path = found[0]
        if graph_path in owner:
            raise AdapterError(
                f"{source}: adapter modules {owner[graph_path]!r} and {module.path!r} both match graph "
                f"module {graph_path!r}"
            )
        owner[graph_path] = module.path
        matches.append(ModuleMatch(module, graph_path, tuple(paths[graph_path])))
    if unmatched and not skip_unmatched:
        first = unmatched[0]
        raise AdapterError(
            f"{source}: key {first_key(first)!r} matches no module of the graph"
            f"{_nearest(first.path, list(by_kind[first.kind]))}{unmatched_hint(unmatched)}"
        )
    return matches


def unmatched_modules(
    modules: Sequence[AdapterModule], matches: Sequence[ModuleMatch]
) -> list[AdapterModule]:
    """The modules of ``modules`` that ``matches`` left out (skipped by ``skip_unmatched``)."""
    taken = {id(match.module) for match in matches}
    return [module for module in modules if id(module) not in taken]


def first_key(module: AdapterModule) -> str:
    return module.keys[min(module.keys)]


def unmatched_hint(unmatched: Sequence[AdapterModule]) -> str:
    """The tail of an unmatched-key error: every such module and the way out."""
    paths = [module.full_path for module in unmatched]
    listed = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
    return (
        f"; {len(paths)} adapter module(s) match no module ({listed}): if the export left them out "
        "(a pooler or head not exported), --skip-unmatched (skip_unmatched=True) skips their keys and "
        "lists them in the report"
    )


def match_path(module: AdapterModule, paths: Sequence[str], source: str = "") -> tuple[str, str] | None:
    """The graph path ``module`` matches (rules 1-3 of the module doc) and the wrapper prefix of the
    adapter's path that rule 3 dropped ("" for rules 1 and 2); None when it matches none."""
    path = module.path
    if path in paths:
        return path, ""
    longer = [p for p in paths if p.endswith("." + path)]
    if len(longer) > 1:
        raise AdapterError(
            f"{source}: adapter module {path!r} ({first_key(module)!r}) is ambiguous: it "
            f"matches graph modules {', '.join(sorted(longer)[:5])}"
        )
    if longer:
        return longer[0], ""
    shorter = [p for p in paths if path.endswith("." + p)]
    if not shorter:
        return None
    graph_path = max(shorter, key=len)
    return graph_path, path[: -len(graph_path) - 1]


def graph_path_of(module: AdapterModule, paths: Sequence[str], source: str = "") -> str | None:
    """The graph path ``module`` matches (:func:`match_path` without the dropped prefix), or None."""
    found = match_path(module, paths, source)
    return found[0] if found is not None else None


def unadaptable(module: AdapterModule, scan: SiteScan, source: str = "") -> str | None:
    """Why ``module`` cannot take its branch although the graph has it (exported as another op, or a node
    that cannot take a branch); None when the graph has no such module at all."""
    key = first_key(module)
    path = module.path
    what = "an embedding (lora_embedding_A/B)" if module.kind == "embedding" else "a Linear / Conv (lora_A/B)"
    for other in scan.sites:
        if other.op not in kind_ops()[module.kind] and _same_module(path, other.module_path):
            return (
                f"{source}: key {key!r} adapts {what}, but module {other.module_path!r} is exported as "
                f"{other.op} node {other.node!r}"
            )
    for skipped in scan.skipped:
        if skipped.op in kind_ops()[module.kind] and _same_module(path, skipped.module_path):
            return _skipped_message(source, key, skipped)
    return None


def _skipped_message(source: str, key: str, skipped: Skipped) -> str:
    return (
        f"{source}: key {key!r}: module {skipped.module_path!r} is {skipped.op} node {skipped.node!r}, "
        f"which cannot take a branch: {skipped.reason}"
    )


def _same_module(adapter_path: str, graph_path: str) -> bool:
    return (
        adapter_path == graph_path
        or graph_path.endswith("." + adapter_path)
        or adapter_path.endswith("." + graph_path)
    )


def _nearest(path: str, paths: Sequence[str]) -> str:
    """A hint listing the graph module paths closest to ``path``."""
    if not paths:
        return " (the graph has no module of this kind)"
    return "; nearest module paths: " + ", ".join(nearest(path, paths, dotted=True))
