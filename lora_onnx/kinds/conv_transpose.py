"""``ConvTranspose`` (1-3-D; strides, pads or auto_pad, output_padding, output_shape, dilations, group):
UNet / VAE decoders' upsampling and segmentation heads.

The weight is (in, out/group, k...). The branch is ConvTransposeA with the base's attributes (r output
channels, A (in, r/a_group, k...)) then a 1x1 ConvB (r -> out, B (out, r/b_group, 1...)), both with the
base's group, so the delta is a grouped ConvTranspose weight and folds:
``delta[i, o, k] = s * sum_r A[i, r, k] * B[g(i) * out/group + o, r]`` for input channel ``i`` of group
``g(i)``. PEFT has no ConvTranspose LoRA; ``export-adapter`` writes these tensors as they are stored, so
a PEFT folder made by lora-onnx applies back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_onnx.errors import AdapterError
from lora_onnx.kinds.base import (
    BranchNames,
    NodeMaker,
    OpKind,
    SiteForm,
    SitePair,
    register,
)
from lora_onnx.kinds.conv import ConvForm, ConvKind, concat_b, mask_rank_channels, pad_attrs
from lora_onnx.kinds.deltas import DeltaRows
from lora_onnx.kinds.site import ConvAttrs, Site
from lora_onnx.model.tensors import np_dtype

if TYPE_CHECKING:
    from lora_onnx.model.manifest import BranchRecord


def transpose_attrs(conv: ConvAttrs, group: int) -> dict[str, object]:
    """The base's ConvTranspose attributes for the branch's A (its own group)."""
    attrs: dict[str, object] = {
        "kernel_shape": list(conv.kernel_shape),
        "strides": list(conv.strides),
        "dilations": list(conv.dilations),
        "group": group,
        **pad_attrs(conv),
    }
    if conv.output_padding:
        attrs["output_padding"] = list(conv.output_padding)
    if conv.output_shape:
        attrs["output_shape"] = list(conv.output_shape)
    return attrs


class ConvTransposeRows(DeltaRows):
    """Rows (input channels) of the (in, out/group, k...) delta; group j's input channels reach only
    group j's rank channels, which reach only group j's output channels."""

    def __init__(self, a: np.ndarray, b: np.ndarray, scale: float, group: int) -> None:
        in_channels, rank_g = a.shape[0], a.shape[1]
        out = b.shape[0]
        self.kernel = a.shape[2:]
        self.a3 = np.asarray(a, np.float32).reshape(in_channels, rank_g, -1) * np.float32(scale)
        self.b2 = np.asarray(b, np.float32).reshape(out, -1)
        self.in_g, self.out_g = in_channels // group, out // group
        self.shape = (in_channels, self.out_g, *self.kernel)

    def add_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        flat = out.reshape(r1 - r0, self.out_g, -1)
        for j in range(r0 // self.in_g, (r1 - 1) // self.in_g + 1):
            lo, hi = max(r0, j * self.in_g), min(r1, (j + 1) * self.in_g)
            b_j = self.b2[j * self.out_g : (j + 1) * self.out_g]  # (out/g, r/g)
            # (out/g, r/g) @ (rows, r/g, K) -> (rows, out/g, K)
            flat[lo - r0 : hi - r0] += np.matmul(b_j[None], self.a3[lo:hi])


class ConvTransposeForm(ConvForm):
    """The conv form with a ConvTranspose A; what it shares with Conv's (groups, init, bias) is inherited."""

    name = "conv_transpose"
    label = "ConvTranspose"
    rank_axes = (1, 1)
    chain_op = ""  # slots other tools make are dense or conv chains (lora_onnx.stages.foreign_slots)

    def a_shape(self, site: Site, rank: int, a_group: int = 1) -> tuple[int, ...]:
        return (site.in_features, rank // a_group, *site.kernel)

    def b_shape(self, site: Site, rank: int, b_group: int = 1) -> tuple[int, ...]:
        return (site.out_features, rank // b_group, *(1 for _ in site.kernel))

    def rank_split(self, is_a: bool, a_group: int, b_group: int) -> int:
        return a_group if is_a else b_group

    def rank_of(self, a: np.ndarray, a_group: int = 1) -> int:
        return int(a.shape[1]) * a_group

    def build(
        self, make: NodeMaker, site: Site, data: str, a: str, b: str, names: BranchNames, a_op: str,
        a_group: int, b_group: int,
    ) -> None:  # fmt: skip
        assert site.conv is not None
        make.node(
            "ConvTranspose", [data, a], [names.a_out], names.a_node, **transpose_attrs(site.conv, a_group)
        )
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
        return ConvTransposeRows(a, b, scale, record.base_group)

    def fold_refusal(self, record: BranchRecord) -> str | None:
        if (record.a_group, record.b_group) != (record.base_group, record.base_group):
            return (
                f"its ConvTranspose branch has A group {record.a_group} and B group {record.b_group} but the "
                f"base has group {record.base_group}: the delta has no grouped-weight form"
            )
        return None

    def expected_shapes(
        self, record: BranchRecord, weight: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        if len(weight) < 3 or record.source_layout != "conv_transpose":
            return None
        out_f, kernel = weight[1] * record.base_group, weight[2:]
        if record.rank % record.a_group or record.rank % record.b_group:
            return None
        a = (weight[0], record.rank // record.a_group, *kernel)
        b = (out_f, record.rank // record.b_group, *(1 for _ in kernel))
        return a, b

    def channel_factor_shape(self, source_layout: str, ndim: int) -> tuple[int, ...]:
        # The output channel is the weight's axis 1 (within a group); only group 1 has a plain broadcast.
        return (1, -1, *(1,) * (ndim - 2))

    def pair_refusal(
        self, site: Site, a: np.ndarray, b: np.ndarray, a_group: int, b_group: int
    ) -> str | None:
        spatial = len(site.kernel)
        ga, gb = a_group, b_group
        ok = a.ndim == b.ndim == 2 + spatial and ga >= 1 and gb >= 1
        ok = ok and a.shape[0] == site.in_features and tuple(a.shape[2:]) == site.kernel
        ok = ok and b.shape[0] == site.out_features and tuple(b.shape[2:]) == (1,) * spatial
        ok = ok and a.shape[1] * ga == b.shape[1] * gb and site.in_features % ga == 0
        ok = ok and site.out_features % gb == 0
        if ok:
            return None
        return (
            f"A ({site.in_features}, r/{ga}, {', '.join(map(str, site.kernel))}) and "
            f"B ({site.out_features}, r/{gb}, {', '.join('1' * spatial)})"
        )

    def site_form(self, pairs: Sequence[SitePair | None], rank: int | None = None) -> SiteForm:
        present = [p for p in pairs if p is not None]
        groups = {(p.a_group, p.b_group) for p in present} or {(1, 1)}
        a_group, b_group = groups.pop() if len(groups) == 1 else (1, 1)
        blocks = max(a_group, b_group)
        per_block = max(
            [(rank or 0) // blocks, *(self.rank_of(p.a, p.a_group) // blocks for p in present), 1]
        )
        return SiteForm(per_block * blocks, a_group, b_group)

    def fit_pair(
        self, site: Site, pair: SitePair, form: SiteForm, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        if (pair.a_group, pair.b_group) != (form.a_group, form.b_group):
            raise AdapterError(
                f"{where}: the adapter's ConvTranspose branch has A group {pair.a_group} and B group "
                f"{pair.b_group}, but the mixed branch holds {form.a_group} and {form.b_group}; mixed "
                "ConvTranspose branches need one group layout for all adapters"
            )
        dtype = np_dtype(site.dtype)
        a, b = np.asarray(pair.a), np.asarray(pair.b)
        per_group = form.rank // max(form.a_group, form.b_group)
        a = np.pad(a, [(0, 0), (0, per_group - a.shape[1]), *[(0, 0)] * (a.ndim - 2)])
        b = np.pad(b, [(0, 0), (0, per_group - b.shape[1]), *[(0, 0)] * (b.ndim - 2)])
        return a.astype(dtype, copy=False), b.astype(dtype, copy=False)

    def stack_dims(
        self, name_is_a: bool, shape: tuple[int, ...], rank: str, form: SiteForm
    ) -> list[int | str]:
        dims: list[int | str] = list(shape)
        dims[1] = rank if max(form.a_group, form.b_group) == 1 else f"{rank}_per_group"
        return dims

    def build_mixed(self, builder: Any, item: Any, data: str, base: str, join: str, make: NodeMaker) -> None:
        site, stem, form = item.site, item.stem, item.form
        assert site.conv is not None
        spatial = len(site.kernel)
        ones = [1] * spatial
        # A [n, in, R/g, k...] -> [in, n, R/g, k...] -> [in, n*R/g, k...]: group j's output block holds
        # every adapter's group-j rank channels, adapter by adapter (the order the mask follows).
        a_t = builder.node(
            make,
            "Transpose",
            [item.a_name],
            f"{stem}.lora_A.grouped",
            perm=[1, 0, 2, *range(3, 3 + spatial)],
        )
        flat = builder.const(
            f"a_flat_t{site.in_features}", np.array([site.in_features, -1, *site.kernel], np.int64)
        )
        a_cat = builder.node(make, "Reshape", [a_t, flat], f"{stem}.lora_A.concat")
        h = builder.node(
            make,
            "ConvTranspose",
            [data, a_cat],
            f"{stem}.lora_A.output",
            **transpose_attrs(site.conv, form.a_group),
        )
        stack_shape = builder.node(make, "Shape", [item.a_name], f"{stem}.lora_A.stack_shape")

        def dims(start: int, end: int, wanted: str) -> str:
            bounds = [builder.const(f"start{start}", np.array([start], np.int64))]
            bounds.append(builder.const(f"end{end}", np.array([end], np.int64)))
            return builder.node(make, "Slice", [stack_shape, *bounds], wanted)

        n = dims(0, 1, f"{stem}.lora_count")
        per = dims(2, 3, f"{stem}.lora_rank_per_group")
        blocks = builder.const(f"blocks{form.blocks}", np.array([form.blocks], np.int64))
        lead = builder.node(make, "Concat", [blocks, n, per], f"{stem}.lora_mask_dims", axis=0)
        kept = mask_rank_channels(builder, item, lead, h, make)
        b_cat = concat_b(builder, item, make)
        d = builder.node(
            make, "Conv", [kept, b_cat], f"{stem}.lora_B.output", kernel_shape=ones, strides=ones,
            group=form.b_group,
        )  # fmt: skip
        make.node("Add", [base, d], [join], builder.name(f"{stem}.lora_add"))


CONV_TRANSPOSE_FORM = ConvTransposeForm()


class ConvTransposeKind(ConvKind):
    """Conv's kind with the weight's axes swapped: (in, out/group, k...); rank bounds, batch rows and the
    PEFT checks it shares with Conv are inherited."""

    op_type = "ConvTranspose"
    noun = ""
    key = "convtranspose"
    form = CONV_TRANSPOSE_FORM
    integer_twins = ()
    torchscript_fold = ""
    weight_layout = "(in, out/group, k...)"
    layout_prefix = "in,out/group,"

    def features(self, shape: tuple[int, ...], group: int) -> tuple[int, int] | str:
        if shape[0] % group:
            return f"its {shape[0]} input channels do not split into group {group}"
        return shape[0], shape[1] * group

    def source_layout(self, site: Site) -> str:
        return "conv_transpose"

    # -- PEFT has no ConvTranspose LoRA: the tensors travel in lora-onnx's own layout (export-adapter)
    def peft_shapes(self, site: Site, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ones = tuple(1 for _ in site.kernel)
        group = site.group
        return (site.in_features, rank // group, *site.kernel), (site.out_features, rank // group, *ones)

    peft_magnitude_shape = OpKind.peft_magnitude_shape
    peft_dora_norm = OpKind.peft_dora_norm  # no DoRA: PEFT defines none for a ConvTranspose

    def peft_groups(self, site: Site) -> tuple[int, int]:
        return site.group, site.group

    def to_peft(self, a: np.ndarray, b: np.ndarray, record: BranchRecord) -> tuple[np.ndarray, np.ndarray]:
        return a, b

    def peft_notes(self, site: Site) -> tuple[str, ...]:
        return ()  # Conv's note is about PEFT's conv forward, which a ConvTranspose never meets


CONV_TRANSPOSE = register(ConvTransposeKind())
