"""PEFT modules on packed projections and renamed modules (onnxruntime-genai's model builder).

The builder packs a layer's q / k / v into one ``attn.qkv_proj`` MatMul (and gate / up into
``mlp.gate_up_proj`` where it fuses them) and renames ``self_attn`` to ``attn``. A PEFT adapter names the
separate modules (``model.layers.0.self_attn.q_proj``), so:

- a module the graph does not have under its own path is tried under the renames: the user's
  ``module_map`` (``REGEX=REPL``, in order) first, then the builder's (``self_attn.`` -> ``attn.``);
- modules whose (renamed) paths are members of a pack (``q_proj``, ``k_proj``, ``v_proj`` of
  ``qkv_proj``) and whose pack is a graph module become one *block branch* on it: A is the members'
  A's side by side along the rank, B is block-diagonal, each member's block at its output slice (in the
  pack's order) and scaled by that member's own scale. The branch is an ordinary dense branch
  (scale 1), so it runs, folds and becomes slots like any other. A member the adapter leaves out adds
  no block; its output slice is what the packed width leaves (one unknown member at most before the
  last adapted one).

DoRA, ``lora_B.bias`` and ``modules_to_save`` on a packed member are refused: they rescale or replace a
whole module, which the pack shares.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lora_onnx.adapters.peft.mapping import AdapterModule, graph_path_of
from lora_onnx.errors import AdapterError
from lora_onnx.kinds import kind_of
from lora_onnx.kinds.site import Site, SiteScan

#: Packed module name -> the modules it packs, in the packed weight's output order.
PACKS: Mapping[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
#: Members of a pack whose output widths are equal by construction (k and v: kv heads x head size; gate and
#: up: the MLP width), which checks a width inferred from what the packed width leaves.
EQUAL_WIDTHS: Mapping[str, tuple[str, str]] = {
    "qkv_proj": ("k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
#: The builder's renames: (pattern, replacement) on module paths.
BUILDER_RENAMES: tuple[tuple[str, str], ...] = ((r"(^|\.)self_attn\.", r"\1attn."),)
#: Joins the member paths of a packed branch in its record's ``peft_path`` (export-adapter reads it).
PACKED_SEP = "+"


@dataclass(frozen=True)
class PackedGroup:
    """Adapter modules that land on one packed projection: the graph path and its sites, and the members
    present (member name -> module), in the pack's order."""

    graph_path: str
    sites: tuple[Site, ...]
    pack: tuple[str, ...]
    members: Mapping[str, AdapterModule]

    @property
    def peft_path(self) -> str:
        return PACKED_SEP.join(module.path for module in self.members.values())


def parse_module_map(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``REGEX=REPL`` items (``--module-map``) as (pattern, replacement), each pattern checked."""
    rules = []
    for item in items:
        pattern, sep, repl = item.partition("=")
        if not sep or not pattern:
            raise AdapterError(f"--module-map takes REGEX=REPL, got {item!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            what = f"{pattern!r} is no regular expression ({exc})"
            raise AdapterError(f"--module-map {item!r}: {what}") from exc
        rules.append((pattern, repl))
    return tuple(rules)


def split_packed(
    scan: SiteScan,
    modules: Sequence[AdapterModule],
    *,
    module_map: Sequence[tuple[str, str]] = (),
    source: str = "",
) -> tuple[list[AdapterModule], tuple[PackedGroup, ...]]:
    """``modules`` with renamed paths where a rename finds the graph's module, without those that land on a
    packed projection, and the packed groups they form (see the module doc)."""
    lora_sites = [site for site in scan.sites if kind_of(site.op).peft_role == "lora"]
    paths = list(dict.fromkeys(site.module_path for site in lora_sites))
    rules = (*module_map, *BUILDER_RENAMES)
    kept: list[AdapterModule] = []
    grouped: dict[str, dict[str, AdapterModule]] = {}
    for module in modules:
        if module.kind != "lora" or graph_path_of(module, paths, source) is not None:
            kept.append(module)
            continue
        candidates = [module.path]
        for pattern, repl in rules:
            renamed = re.sub(pattern, repl, candidates[-1])
            if renamed != candidates[-1]:
                candidates.append(renamed)
        renamed_module = None
        for candidate in candidates[1:]:
            probe = replace(module, path=candidate)
            if graph_path_of(probe, paths, source) is not None:
                renamed_module = probe
                break
        if renamed_module is not None:
            kept.append(renamed_module)
            continue
        packed = _pack_of(candidates, paths, source)
        if packed is None:
            kept.append(module)  # the usual "matches no module" error names it
            continue
        graph_path, member = packed
        grouped.setdefault(graph_path, {})
        if member in grouped[graph_path]:
            raise AdapterError(
                f"{source}: modules {grouped[graph_path][member].path!r} and {module.path!r} both land on "
                f"{member} of packed projection {graph_path!r}"
            )
        grouped[graph_path][member] = module
    groups = []
    for graph_path, members in grouped.items():
        pack = PACKS[graph_path.rsplit(".", 1)[-1]]
        ordered = {name: members[name] for name in pack if name in members}
        sites = tuple(site for site in lora_sites if site.module_path == graph_path)
        groups.append(PackedGroup(graph_path, sites, pack, ordered))
    return kept, tuple(groups)


def _pack_of(candidates: Sequence[str], paths: Sequence[str], source: str) -> tuple[str, str] | None:
    """(graph path of the packed projection, member name) for the first candidate path that is a member
    of a pack the graph has; None when none is."""
    for candidate in candidates:
        parent, _, member = candidate.rpartition(".")
        for packed, members in PACKS.items():
            if member in members:
                probe = AdapterModule(f"{parent}.{packed}" if parent else packed)
                found = graph_path_of(probe, paths, source)
                if found is not None:
                    return found, member
    return None


def refuse_extras(group: PackedGroup, source: str) -> None:
    """DoRA, ``lora_B.bias`` and modules_to_save act on a whole module, which a pack shares: refused."""
    for module in group.members.values():
        for role, what in (("lora_magnitude_vector", "DoRA"), ("lora_B.bias", "a lora_B bias")):
            if role in module.keys:
                raise AdapterError(
                    f"{source}: module {module.path!r} lands on packed projection {group.graph_path!r}, "
                    f"but has {what}, which acts on the whole module; a packed branch carries A and B only"
                )


def block_branch(
    group: PackedGroup,
    out_features: int,
    tensors: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    source: str,
) -> tuple[np.ndarray, np.ndarray]:
    """A (in, R) and B (R, out) of the packed branch from each member's A (in, r), B (r, out_i) and scale
    (``tensors``: member name -> (A, B, scale), in storage layouts); B is block-diagonal over the output
    slices, each block scaled."""
    widths: dict[str, int | None] = {name: None for name in group.pack}
    for name, (_, b, _) in tensors.items():
        widths[name] = int(b.shape[1])
    unknown = [name for name, width in widths.items() if width is None]
    if len(unknown) == 1:  # the one member left out takes what the packed width leaves
        widths[unknown[0]] = out_features - sum(w for w in widths.values() if w is not None)
    pair = EQUAL_WIDTHS.get(group.graph_path.rsplit(".", 1)[-1])
    first, second = (widths[name] for name in pair) if pair is not None else (None, None)
    if pair is not None and None not in (first, second) and first != second:
        raise AdapterError(
            f"{source}: packed projection {group.graph_path!r}: {pair[0]} would be {first} wide but "
            f"{pair[1]} {second}, and they are equal in such a pack; the adapter was trained on another base"
        )
    last = max(group.pack.index(name) for name in tensors)
    offsets: dict[str, int] = {}
    offset = 0
    for name in group.pack[: last + 1]:
        width = widths[name]
        if width is None or width < 0:
            raise AdapterError(
                f"{source}: packed projection {group.graph_path!r}: the adapter leaves out "
                f"{', '.join(unknown)}, so the output slice of {group.pack[last]} cannot be placed; "
                f"adapt all but one of {', '.join(group.pack)}"
            )
        offsets[name] = offset
        offset += width
    total = sum(w for w in widths.values() if w is not None)
    if offset > out_features or (None not in widths.values() and total != out_features):
        raise AdapterError(
            f"{source}: the modules on packed projection {group.graph_path!r} have {total} outputs "
            f"together, but it has {out_features}; the adapter was trained on another base"
        )
    rank = sum(int(a.shape[1]) for a, _, _ in tensors.values())
    in_features = next(iter(tensors.values()))[0].shape[0]
    a_packed = np.zeros((in_features, rank), np.float32)
    b_packed = np.zeros((rank, out_features), np.float32)
    r0 = 0
    for name in group.pack:
        if name not in tensors:
            continue
        a, b, scale = tensors[name]
        r1 = r0 + a.shape[1]
        o0 = offsets[name]
        a_packed[:, r0:r1] = a
        b_packed[r0:r1, o0 : o0 + b.shape[1]] = np.float32(scale) * np.asarray(b, np.float32)
        r0 = r1
    return a_packed, b_packed
