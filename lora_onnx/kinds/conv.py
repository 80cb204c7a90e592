"""``Conv`` (1-3-D, any strides, pads, dilations and groups): the conv branch form, PEFT's Conv LoRA.

The branch is ConvA (the base's kernel, strides, pads and dilations; r output channels) then a 1x1 ConvB
(r -> out): A (r, in/a_group, k...), B (out, r/b_group, 1...). A fresh branch takes the base's group on
both, so its delta is a grouped weight and folds; PEFT's A is dense (group 1) and its B takes the base's
group, like PEFT's own layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from lora_onnx.errors import AdapterError
from lora_onnx.kinds.base import (
    BranchForm,
    BranchNames,
    NodeMaker,
    OpKind,
    SiteForm,
    SitePair,
    float_weight,
    register,
)
from lora_onnx.kinds.deltas import ConvRows, DeltaRows
from lora_onnx.kinds.site import ConvAttrs, Site
from lora_onnx.model.graph import attribute_values
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.tensors import np_dtype
from lora_onnx.model.values import name_of
from lora_onnx.model.weights import source_value

if TYPE_CHECKING:
    from lora_onnx.model.manifest import BranchRecord


def conv_attrs(node: ir.Node, kernel: tuple[int, ...]) -> ConvAttrs:
    """A Conv / ConvTranspose node's attributes with ONNX's defaults filled in."""
    spatial = len(kernel)
    attrs = attribute_values(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    return ConvAttrs(
        kernel_shape=kernel,
        strides=tuple(int(v) for v in attrs.get("strides", [1] * spatial)),  # type: ignore[union-attr]
        dilations=tuple(int(v) for v in attrs.get("dilations", [1] * spatial)),  # type: ignore[union-attr]
        pads=tuple(int(v) for v in attrs.get("pads", [0] * 2 * spatial)),  # type: ignore[union-attr]
        auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
        group=int(attrs.get("group", 1)),  # type: ignore[call-overload]
        output_padding=tuple(int(v) for v in attrs.get("output_padding", ())),  # type: ignore[union-attr]
        output_shape=tuple(int(v) for v in attrs.get("output_shape", ())),  # type: ignore[union-attr]
    )


def pad_attrs(conv: ConvAttrs) -> dict[str, object]:
    """The padding a branch conv copies from its base: explicit pads, or the base's auto_pad."""
    return {"pads": list(conv.pads)} if conv.auto_pad == "NOTSET" else {"auto_pad": conv.auto_pad}


def _dense_a(a: np.ndarray, group: int, in_channels: int) -> np.ndarray:
    """A grouped ConvA weight (r, in/g, k...) as the dense (r, in, k...) weight computing the same."""
    if group == 1:
        return a
    rank, width = a.shape[0], in_channels // group
    out = np.zeros((rank, in_channels, *a.shape[2:]), a.dtype)
    step = rank // group
    for j in range(group):
        out[j * step : (j + 1) * step, j * width : (j + 1) * width] = a[j * step : (j + 1) * step]
    return out


def _dense_b(b: np.ndarray, group: int) -> np.ndarray:
    """A grouped 1x1 ConvB weight (out, r/g, 1...) as the dense (out, r, 1...) weight computing the same."""
    if group == 1:
        return b
    out_channels, step = b.shape[0], b.shape[1]
    rows = out_channels // group
    out = np.zeros((out_channels, step * group, *b.shape[2:]), b.dtype)
    for j in range(group):
        out[j * rows : (j + 1) * rows, j * step : (j + 1) * step] = b[j * rows : (j + 1) * rows]
    return out


def pad_blocks(value: np.ndarray, axis: int, blocks: int, size: int) -> np.ndarray:
    """Zero-pad each of ``blocks`` equal blocks along ``axis`` to ``size`` (a group's rank channels
    must stay in their group)."""
    shape = value.shape
    split = (*shape[:axis], blocks, shape[axis] // blocks, *shape[axis + 1 :])
    pad = [(0, 0)] * len(split)
    pad[axis + 1] = (0, size - shape[axis] // blocks)
    padded = np.pad(value.reshape(split), pad)
    return padded.reshape(*shape[:axis], blocks * size, *shape[axis + 1 :])


class ConvForm(BranchForm):
    name = "conv"
    #: What messages call a branch of this form.
    label = "conv"
    rank_axes = (0, 1)
    chain_op = "Conv"
    grouped = True
    b_takes_bias = True

    def a_shape(self, site: Site, rank: int, a_group: int = 1) -> tuple[int, ...]:
        return (rank, site.in_features // a_group, *site.kernel)

    def b_shape(self, site: Site, rank: int, b_group: int = 1) -> tuple[int, ...]:
        return (site.out_features, rank // b_group, *(1 for _ in site.kernel))

    def fresh_groups(self, site: Site) -> tuple[int, int]:
        return site.group, site.group

    def a_init(
        self, site: Site, rank: int, shape: tuple[int, ...], draw: Callable[..., np.ndarray]
    ) -> np.ndarray:
        return draw(shape, math.prod(shape[1:]))

    def build(
        self, make: NodeMaker, site: Site, data: str, a: str, b: str, names: BranchNames, a_op: str,
        a_group: int, b_group: int,
    ) -> None:  # fmt: skip
        assert site.conv is not None
        make.node(
            "Conv", [data, a], [names.a_out], names.a_node, kernel_shape=list(site.conv.kernel_shape),
            strides=list(site.conv.strides), dilations=list(site.conv.dilations), group=a_group,
            **pad_attrs(site.conv),
        )  # fmt: skip
        ones = [1] * len(site.conv.kernel_shape)
        make.node(
            "Conv",
            [names.scaled, b],
            [names.b_out],
            names.b_node,
            kernel_shape=ones,
            strides=ones,
            group=b_group,
        )

    def delta_rows(self, a: np.ndarray, b: np.ndarray, scale: float, record: BranchRecord) -> DeltaRows:
        return ConvRows(a, b, scale, record.b_group)

    def fold_refusal(self, record: BranchRecord) -> str | None:
        if record.a_group != record.base_group:
            return (
                f"its conv A is dense (group {record.a_group}) but the base conv has group "
                f"{record.base_group}: the delta mixes input groups and has no grouped-weight form (PEFT "
                "cannot merge it either)"
            )
        return None

    def expected_shapes(
        self, record: BranchRecord, weight: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        if len(weight) < 3 or record.source_layout != "conv":
            return None
        in_f = weight[1] * record.base_group
        kernel = weight[2:]
        if in_f % record.a_group or record.rank % record.b_group:
            return None
        a = (record.rank, in_f // record.a_group, *kernel)
        b = (weight[0], record.rank // record.b_group, *(1 for _ in kernel))
        return a, b

    def channel_axis(self, ndim: int) -> tuple[int, ...]:
        return (-1, *([1] * (ndim - 1)))

    def channel_factor_shape(self, source_layout: str, ndim: int) -> tuple[int, ...]:
        return (-1, *(1,) * (ndim - 1))

    def pair_refusal(
        self, site: Site, a: np.ndarray, b: np.ndarray, a_group: int, b_group: int
    ) -> str | None:
        ga, gb = a_group, b_group
        spatial = len(site.kernel)
        ok = a.ndim == b.ndim == 2 + spatial and ga >= 1 and gb >= 1 and site.in_features % ga == 0
        ok = ok and tuple(a.shape[1:]) == (site.in_features // ga, *site.kernel)
        ok = ok and b.shape[0] == site.out_features and tuple(b.shape[2:]) == (1,) * spatial
        ok = ok and a.shape[0] == b.shape[1] * gb and a.shape[0] % max(ga, gb) == 0
        ok = ok and site.out_features % gb == 0
        if ok:
            return None
        return (
            f"A (r, {site.in_features // max(ga, 1)}, {', '.join(map(str, site.kernel))}) and "
            f"B ({site.out_features}, r/{gb}, {', '.join('1' * spatial)})"
        )

    def groups_refusal(self, plan_groups: tuple[int, int], slot_groups: tuple[int, int]) -> bool:
        return plan_groups != slot_groups

    def rank_group_refusal(self, rank: int, a_group: int, b_group: int) -> str | None:
        group = max(a_group, b_group)
        if rank % group:
            return f"rank {rank} is not a multiple of the {self.label} branch's group {group}"
        return None

    def site_form(self, pairs: Sequence[SitePair | None], rank: int | None = None) -> SiteForm:
        """Groups kept when all pairs agree, else dense (1); R padded per group block."""
        present = [p for p in pairs if p is not None]
        a_groups = {p.a_group for p in present} or {1}
        b_groups = {p.b_group for p in present} or {1}
        a_group = a_groups.pop() if len(a_groups) == 1 else 1
        b_group = b_groups.pop() if len(b_groups) == 1 else 1
        if a_group > 1 and b_group > 1 and a_group != b_group:
            a_group = b_group = 1
        blocks = max(a_group, b_group)
        per_block = max(
            [(rank or 0) // blocks, *(self.rank_of(p.a, p.a_group) // blocks for p in present), 1]
        )
        return SiteForm(per_block * blocks, a_group, b_group)

    def fit_pair(
        self, site: Site, pair: SitePair, form: SiteForm, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        dtype = np_dtype(site.dtype)
        a, b = np.asarray(pair.a), np.asarray(pair.b)
        if (pair.a_group != form.a_group and form.a_group != 1) or (
            pair.b_group != form.b_group and form.b_group != 1
        ):
            raise AdapterError(
                f"{where}: the adapter's conv branch has A group {pair.a_group} and B group {pair.b_group}, "
                f"but the mixed branch holds A group {form.a_group} and B group {form.b_group}; build the "
                "mixed model with this adapter among its adapters"
            )
        if pair.a_group != form.a_group:
            a = _dense_a(a, pair.a_group, site.in_features)
        if pair.b_group != form.b_group:
            b = _dense_b(b, pair.b_group)
        blocks = form.blocks
        a = pad_blocks(a, 0, blocks, form.rank // blocks)
        if form.b_group == blocks:
            b = np.pad(b, [(0, 0), (0, form.rank // blocks - b.shape[1]), *[(0, 0)] * (b.ndim - 2)])
        else:  # B dense over a grouped A: B's rank axis holds the A groups' blocks
            b = pad_blocks(b, 1, blocks, form.rank // blocks)
        return a.astype(dtype, copy=False), b.astype(dtype, copy=False)

    def stack_dims(
        self, name_is_a: bool, shape: tuple[int, ...], rank: str, form: SiteForm
    ) -> list[int | str]:
        dims: list[int | str] = list(shape)
        if name_is_a:
            dims[0] = rank
        else:
            dims[1] = rank if form.b_group == 1 else f"{rank}_per_group"
        return dims

    def build_mixed(self, builder: Any, item: Any, data: str, base: str, join: str, make: NodeMaker) -> None:
        site, stem, form = item.site, item.stem, item.form
        assert site.conv is not None
        spatial = len(site.kernel)
        ones = [1] * spatial
        blocks = form.blocks
        # A [n, R, C/ga, k...] -> [blocks, n, R/blocks, C/ga, k...] -> [n*R, C/ga, k...] (group-major)
        # (Reshape's 0 copies the dim at the same position, so the trailing dims are spelled out.)
        tail = [site.in_features // form.a_group, *site.kernel]
        split = builder.const("a_split", np.array([0, blocks, -1, *tail], np.int64))
        a5 = builder.node(make, "Reshape", [item.a_name, split], f"{stem}.lora_A.split")
        a_arr = builder.node(
            make, "Transpose", [a5], f"{stem}.lora_A.grouped", perm=[1, 0, 2, *range(3, 4 + spatial)]
        )
        flat = builder.const("a_flat", np.array([-1, *tail], np.int64))
        a_cat = builder.node(make, "Reshape", [a_arr, flat], f"{stem}.lora_A.concat")
        h = builder.node(
            make, "Conv", [data, a_cat], f"{stem}.lora_A.output", kernel_shape=list(site.kernel),
            strides=list(site.conv.strides), dilations=list(site.conv.dilations), group=form.a_group,
            **pad_attrs(site.conv),
        )  # fmt: skip
        kept = mask_rank_channels(builder, item, grouped_lead(builder, item, a_arr, make), h, make)
        # B [n, out, R/gb, 1...] -> [out, (R/gb-blocks,) n, R/blocks, 1...] -> [out, n*R/gb, 1...]
        b_cat = concat_b(builder, item, make)
        d = builder.node(
            make, "Conv", [kept, b_cat], f"{stem}.lora_B.output", kernel_shape=ones, strides=ones,
            group=form.b_group,
        )  # fmt: skip
        make.node("Add", [base, d], [join], builder.name(f"{stem}.lora_add"))


def grouped_lead(builder: Any, item: Any, a_arr: str, make: NodeMaker) -> str:
    """[blocks, n, R/blocks]: the leading dims of a conv A stack arranged group-major."""
    a_shape = builder.node(make, "Shape", [a_arr], f"{item.stem}.lora_A.grouped_shape")
    starts, ends = (
        builder.const("start0", np.array([0], np.int64)),
        builder.const("end3", np.array([3], np.int64)),
    )
    return builder.node(make, "Slice", [a_shape, starts, ends], f"{item.stem}.lora_mask_dims")


def mask_rank_channels(builder: Any, item: Any, lead: str, h: str, make: NodeMaker) -> str:
    """``h`` [B, n*R, ...] with every rank channel but the row's adapter's zeroed (base rows: all);
    ``lead`` holds [blocks, n, R/blocks], the order of h's rank channels."""
    site, stem = item.site, item.stem
    ones = [1] * len(site.kernel)
    # mask [B, 1, n, 1] expanded to [blocks, n, R/blocks] -> [B, n*R, 1...]
    mask4 = builder.node(make, "Expand", [builder.onehot(site.dtype), lead], f"{stem}.lora_mask_grouped")
    mask_shape = builder.const("mask_shape", np.array([0, -1, *ones], np.int64))
    mask = builder.node(make, "Reshape", [mask4, mask_shape], f"{stem}.lora_mask")
    return builder.node(make, "Mul", [h, mask], f"{stem}.lora_kept")


def concat_b(builder: Any, item: Any, make: NodeMaker) -> str:
    """The B stack [n, out, R/gb, 1...] as one 1x1 conv weight [out, n*R/gb, 1...] (group-major)."""
    site, stem, form = item.site, item.stem, item.form
    spatial = len(site.kernel)
    ones = [1] * spatial
    blocks = form.blocks
    if form.b_group == blocks:
        b_arr = builder.node(
            make, "Transpose", [item.b_name], f"{stem}.lora_B.grouped", perm=[1, 0, *range(2, 3 + spatial)]
        )
    else:
        split_b = builder.const("b_split", np.array([0, 0, blocks, -1, *ones], np.int64))
        b5 = builder.node(make, "Reshape", [item.b_name, split_b], f"{stem}.lora_B.split")
        b_arr = builder.node(
            make, "Transpose", [b5], f"{stem}.lora_B.grouped", perm=[1, 2, 0, *range(3, 4 + spatial)]
        )
    b_flat = builder.const("b_flat", np.array([site.out_features, -1, *ones], np.int64))
    return builder.node(make, "Reshape", [b_arr, b_flat], f"{stem}.lora_B.concat")


CONV_FORM = ConvForm()


class ConvKind(OpKind):
    op_type = "Conv"
    noun = "conv"
    key = "conv"
    form = CONV_FORM
    integer_twins = ("ConvInteger", "QLinearConv")
    bias_input = True
    #: What TorchScript's constant folding computes into an anonymous ``onnx::Conv_N`` weight.
    torchscript_fold = "BatchNorm"
    #: The weight's layout as the node reads it, for messages and ``Site.layout``.
    weight_layout = "(out, in/group, k...)"
    layout_prefix = "out,in/group,"

    def features(self, shape: tuple[int, ...], group: int) -> tuple[int, int] | str:
        """(in, out) features of a weight of ``shape`` at ``group``, or why they do not split."""
        return shape[1] * group, shape[0]

    def site(self, node: ir.Node) -> Site | str:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return "has no weight input"
        weight = float_weight(node, "the data input is a constant")
        if isinstance(weight, str):
            return weight
        shape = weight.node_shape
        if len(shape) < 3:
            return (
                f"{self.noun or self.op_type} weight {weight.initializer!r} has shape {list(shape)}; "
                f"expected {self.weight_layout}"
            )
        if 0 in shape:
            return f"weight {weight.initializer!r} is empty (shape {list(shape)})"
        attrs = attribute_values(node)
        kernel = tuple(int(k) for k in attrs.get("kernel_shape", shape[2:]))  # type: ignore[union-attr]
        if kernel != tuple(shape[2:]):
            return f"kernel_shape {list(kernel)} disagrees with weight {weight.initializer!r} {list(shape)}"
        conv = conv_attrs(node, kernel)
        features = self.features(shape, conv.group)
        if isinstance(features, str):
            return features
        layout = self.layout_prefix + ",".join(f"k{i + 1}" for i in range(len(kernel)))
        path = module_path(node, source_value(node.inputs[1]))
        return Site(
            node.name, self.op_type, path, name_of(node.inputs[0]), name_of(node.outputs[0]), weight, layout,
            in_features=features[0], out_features=features[1], conv=conv,
        )  # fmt: skip

    def source_layout(self, site: Site) -> str:
        return "conv"

    def rank_bounds(self, site: Site) -> tuple[int, int]:
        # A conv's weight is (out/group, in/group * kernel size) per group: a grouped conv's bounds are the
        # groups times each group's min and max.
        group = site.group
        sides = (site.in_features // group * math.prod(site.kernel), site.out_features // group)
        return group * min(sides), group * max(sides)

    def batch_rows(self, site: Site, value: np.ndarray, rows: int) -> np.ndarray | str:
        if value.ndim < 3 or value.shape[0] != rows:
            return f"its first dim is {value.shape[0] if value.ndim else None}, not the batch ({rows} rows)"
        return value

    # -- PEFT: its conv layouts are lora-onnx's, A with group 1 and B with the base's group
    def peft_shapes(self, site: Site, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ones = tuple(1 for _ in site.kernel)
        return (rank, site.in_features, *site.kernel), (site.out_features, rank // site.group, *ones)

    def peft_rank_refusal(self, site: Site, rank: int) -> str | None:
        if rank % site.group:
            group, noun = site.group, self.noun or self.op_type
            return f"rank {rank} is not a multiple of the groups ({group}) of {noun} node {site.node!r}"
        return None

    def peft_magnitude_shape(self, site: Site) -> tuple[int, ...]:
        return (1, site.out_features, *(1 for _ in site.kernel))

    def peft_base_shape(self, site: Site) -> tuple[int, ...]:
        return site.weight.node_shape

    def from_peft(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a, b

    def peft_groups(self, site: Site) -> tuple[int, int]:
        return 1, site.group

    def to_peft(self, a: np.ndarray, b: np.ndarray, record: BranchRecord) -> tuple[np.ndarray, np.ndarray]:
        # PEFT's conv A is dense over all input channels: a grouped A expands block-diagonally.
        return _dense_a(a, record.a_group, a.shape[1] * record.a_group), b

    def peft_notes(self, site: Site) -> tuple[str, ...]:
        if site.conv is not None and any(d != 1 for d in site.conv.dilations):
            return (
                f"{site.module_path}: dilated conv (dilations {list(site.conv.dilations)}): the "
                "branch's conv A uses the base's dilation, which PEFT's forward does not (peft issue "
                "3697); outputs equal PEFT's merged model",
            )
        return ()

    def peft_dora_norm(
        self, weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, site: Site
    ) -> np.ndarray:
        # PEFT's exact expression: for a grouped conv with PEFT's dense A the reshape is not the branch's
        # real delta, but it is what PEFT's forward divides by, so it is reproduced, not corrected.
        rank = a.shape[0]
        delta = (b.reshape(-1, rank) @ a.reshape(rank, -1)).reshape(weight.shape)
        combined = weight + np.float32(scale) * delta
        return np.sqrt(np.sum(np.square(combined), axis=tuple(range(1, combined.ndim))))


CONV = register(ConvKind())
