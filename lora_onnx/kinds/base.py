"""What every op kind and every branch form says about itself, and the registry that picks them.

An *op kind* (:class:`OpKind`, one file per kind in this package) is one ONNX op type a branch can sit
beside: how one of its nodes becomes a :class:`~lora_onnx.kinds.site.Site` (or the reason it cannot),
which branch form it takes, the layout of its source weight, its rank bounds, how a PEFT adapter's
tensors map onto it. A *branch form* (:class:`BranchForm`) is the shape of the branch itself, shared by
kinds that compute alike (MatMul, Gemm, Gather and MatMulNBits all take the dense form): A/B shapes,
init fan-in, the branch's nodes, its fold delta in row blocks, its stacked (mixed-batch) layout and its
slot dims. ``BranchRecord.kind`` names the form and ``BranchRecord.op`` the kind, so a model's manifest
leads back to both.

The model: PEFT's ``tuners/lora/layer.py`` (one class per layer type, picked by a dispatcher list) and
onnxscript's fusion rules (one shared base, each op kind overrides only what differs). A new kind is one
file here plus one line in :mod:`lora_onnx.kinds`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from lora_onnx.errors import LoraOnnxError
from lora_onnx.model.graph import FreshNames
from lora_onnx.model.values import is_constant, name_of
from lora_onnx.model.weights import WeightRef, resolve_weight

if TYPE_CHECKING:
    from lora_onnx.kinds.deltas import DeltaRows
    from lora_onnx.kinds.site import Site
    from lora_onnx.model.manifest import BranchRecord

#: Domains of ONNX's own ops.
ONNX_DOMAINS = ("", "ai.onnx")
#: Element types a LoRA branch can compute in (it adds float products to the node's output).
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


@dataclass(frozen=True)
class BranchNames:
    """The value and node names of one branch, already unique in the graph."""

    stem: str
    a_out: str
    scaled: str
    b_out: str
    a_node: str
    b_node: str


@dataclass(frozen=True)
class SitePair:
    """One adapter at one site: A and B in storage layouts (dense A (in, r), B (r, out); conv
    A (r, in/a_group, k...), B (out, r/b_group, 1...)) with the LoRA scale folded into B."""

    a: np.ndarray
    b: np.ndarray
    a_group: int = 1
    b_group: int = 1


@dataclass(frozen=True)
class SiteForm:
    """A site's stacked layout: the padded rank R and the groups of A / B (1 for dense)."""

    rank: int
    a_group: int = 1
    b_group: int = 1

    @property
    def blocks(self) -> int:
        """Rank blocks that stay together (a grouped conv splits the rank into groups)."""
        return max(self.a_group, self.b_group)


class NodeMaker:
    """What a form needs to add nodes to an onnx-ir graph: fresh names, and nodes made from value names
    (records name values), collected in :attr:`nodes` for the stage to insert where they belong."""

    def __init__(self, names: FreshNames, values: dict[str, ir.Value]) -> None:
        self.names, self.values = names, values
        self.nodes: list[ir.Node] = []

    def name(self, wanted: str) -> str:
        return self.names(wanted)

    def node(
        self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, *, domain: str = "",
        **attrs: Any,
    ) -> ir.Node:  # fmt: skip
        """A node reading and writing the named values; an input no node writes yet is a forward reference
        that the node writing it later fills (a form builds A and B before the stage adds the Mul between)."""
        node = ir.node(
            op, [self._value(value) if value else None for value in inputs], attrs or None, domain=domain,
            outputs=[self._value(value) for value in outputs], name=name,
        )  # fmt: skip
        return self._add(node)

    def _value(self, name: str) -> ir.Value:
        if name not in self.values:
            self.values[name] = ir.Value(name=name)
        return self.values[name]

    def _add(self, node: ir.Node) -> ir.Node:
        self.nodes.append(node)
        return node


class BranchForm:
    """How a branch's A and B are shaped, computed and folded. Subclasses override what differs.

    Tensors are stored in the layout the branch's nodes read (``a_shape`` / ``b_shape``); ``a_group`` /
    ``b_group`` only mean something for forms with grouped convolutions.
    """

    #: The name recorded as ``BranchRecord.kind``.
    name: ClassVar[str]
    #: Axes of the rank in A and in B (B's rank axis counts rank / b_group).
    rank_axes: ClassVar[tuple[int, int]]
    #: Whether A / B groups are part of the form (grouped convs).
    grouped: ClassVar[bool] = False
    #: Whether the B node takes a bias input of its own (a 1x1 conv does; a MatMul needs an Add).
    b_takes_bias: ClassVar[bool] = False
    #: The op of both A and B nodes when a slot chain of this form can be recognised from the graph alone
    #: (:mod:`lora_onnx.stages.foreign_slots`); "" when it cannot.
    chain_op: ClassVar[str] = ""

    # -- shapes
    def a_shape(self, site: Site, rank: int, a_group: int = 1) -> tuple[int, ...]:
        raise NotImplementedError

    def b_shape(self, site: Site, rank: int, b_group: int = 1) -> tuple[int, ...]:
        raise NotImplementedError

    def fits_ndim(self, ndim: int) -> bool:
        """Whether a stored A / B of ``ndim`` dims can be this form's (dense 2, convs 3 or more)."""
        return ndim >= 3 if self.grouped else ndim == 2

    def rank_of(self, a: np.ndarray, a_group: int = 1) -> int:
        """The rank of a stored A."""
        return int(a.shape[self.rank_axes[0]])

    def rank_split(self, is_a: bool, a_group: int, b_group: int) -> int:
        """How many groups the rank axis of A (``is_a``) or B is split into (it holds rank / that)."""
        return 1 if is_a else b_group

    def ranks(self, a: np.ndarray, b: np.ndarray, a_group: int, b_group: int) -> tuple[int, int]:
        """The rank A says and the rank B says (they must agree)."""
        return self.rank_of(a, a_group), int(b.shape[self.rank_axes[1]]) * b_group

    def fresh_groups(self, site: Site) -> tuple[int, int]:
        """(a_group, b_group) of a fresh branch: one that folds back into the site's weight."""
        return 1, 1

    # -- init
    def a_init(
        self, site: Site, rank: int, shape: tuple[int, ...], draw: Callable[..., np.ndarray]
    ) -> np.ndarray:
        """PEFT's kaiming-uniform A; ``draw(shape, fan_in)``."""
        raise NotImplementedError

    def b_fan_in(self, rank: int, b_group: int) -> int:
        return rank // b_group

    # -- graph
    def build(
        self, make: NodeMaker, site: Site, data: str, a: str, b: str, names: BranchNames, a_op: str,
        a_group: int, b_group: int,
    ) -> None:  # fmt: skip
        """Add ``A`` (``data`` -> ``names.a_out``) and ``B`` (``names.scaled`` -> ``names.b_out``);
        ``a_op`` is the kind's A op (``Gather`` for an embedding's table lookup)."""
        raise NotImplementedError

    # -- fold
    def delta_rows(self, a: np.ndarray, b: np.ndarray, scale: float, record: BranchRecord) -> DeltaRows:
        """The delta ``s * B(A(.))`` in the layout of the record's source weight, by rows."""
        raise NotImplementedError

    def fold_refusal(self, record: BranchRecord) -> str | None:
        """Why the record's branch cannot fold into its weight (None: it can)."""
        return None

    def expected_shapes(
        self, record: BranchRecord, weight: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The (A, B) shapes the record's branch needs for a source weight of shape ``weight``; None for
        layouts the form does not know (left to the code that made them)."""
        return None

    def channel_axis(self, ndim: int) -> tuple[int, ...]:
        """A broadcast shape putting a per-output-channel vector along B's output axis."""
        return (1, -1)

    def channel_factor_shape(self, source_layout: str, ndim: int) -> tuple[int, ...]:
        """A per-output-channel factor's broadcast shape against the source weight."""
        raise NotImplementedError

    # -- stacked (mixed batches) and checks of user-given pairs
    def pair_refusal(
        self, site: Site, a: np.ndarray, b: np.ndarray, a_group: int, b_group: int
    ) -> str | None:
        """None when ``a`` / ``b`` fit ``site``, else what the site takes."""
        raise NotImplementedError

    def groups_refusal(self, plan_groups: tuple[int, int], slot_groups: tuple[int, int]) -> bool:
        """Whether an adapter's groups conflict with a slot's (forms without groups never do)."""
        return False

    def rank_group_refusal(self, rank: int, a_group: int, b_group: int) -> str | None:
        """Why ``rank`` does not split over the branch's groups (None: it does)."""
        return None

    def site_form(self, pairs: Sequence[SitePair | None], rank: int | None = None) -> SiteForm:
        """The stacked layout holding every pair (R = the largest rank, or ``rank`` when given)."""
        present = [p for p in pairs if p is not None]
        return SiteForm(max(rank or 0, *(self.rank_of(p.a, p.a_group) for p in present), 1))

    def fit_pair(
        self, site: Site, pair: SitePair, form: SiteForm, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """``pair`` in ``form``: rank zero-padded to ``form.rank`` (groups expanded where needed)."""
        raise NotImplementedError

    def stack_shapes(self, site: Site, form: SiteForm) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One adapter's A and B shapes inside the site's stacks."""
        return self.a_shape(site, form.rank, form.a_group), self.b_shape(site, form.rank, form.b_group)

    def build_mixed(self, builder: Any, item: Any, data: str, base: str, join: str, make: NodeMaker) -> None:
        """The mixed branch of ``item`` (a :class:`lora_onnx.stages.stacked.MixedSite`) into ``make``, ending
        in the Add of ``base`` that writes ``join``: each batch row runs the stacked adapter its index picks
        (``builder``: the stage's shared index values and node helper)."""
        raise NotImplementedError

    def stack_dims(
        self, name_is_a: bool, shape: tuple[int, ...], rank: str, form: SiteForm
    ) -> list[int | str]:
        """Declared dims of a stack input (after the adapter axis): the rank is symbolic."""
        raise NotImplementedError


class OpKind:
    """One ONNX op type a branch can sit beside. Subclasses override what differs."""

    op_type: ClassVar[str]
    #: What messages call one of its nodes ("conv"); the op type when empty.
    noun: ClassVar[str] = ""
    #: The op key of ``--ops`` (and recipe files); "" for kinds only PEFT adapters reach.
    key: ClassVar[str]
    domains: ClassVar[tuple[str, ...]] = ONNX_DOMAINS
    form: ClassVar[BranchForm]
    #: Integer-arithmetic twins of this op (quantized models), listed as skipped with the reason.
    integer_twins: ClassVar[tuple[str, ...]] = ()
    #: The PEFT module role its adapter keys carry: "lora" (lora_A/B) or "embedding" (lora_embedding_A/B).
    peft_role: ClassVar[str] = "lora"
    #: Whether a PEFT adapter's branch on it can become a slot (embedding adapters cannot: A is a table).
    slottable: ClassVar[bool] = True
    #: The op of the branch's A node when the form allows a choice (an embedding looks its A up).
    a_op: ClassVar[str] = ""
    #: Whether the site's join depends on its data input's rank (MatMul's bias Add), so ranks are inferred.
    wants_data_rank: ClassVar[bool] = False
    #: Whether the node's own third input is its bias (Gemm, Conv, ConvTranspose).
    bias_input: ClassVar[bool] = False
    #: Whether its bias, if any, is a separate Add after the node (MatMul).
    bias_after: ClassVar[bool] = False
    #: The node input holding the weight (an embedding's table is input 0).
    weight_input: ClassVar[int] = 1
    #: Whether the weight is a torch Linear's (out, in), possibly transposed by the exporter (MatMul, Gemm).
    linear: ClassVar[bool] = False
    #: Whether the weight is packed quantized blocks the node reads itself (MatMulNBits): never copied,
    #: untied or replaced as a float tensor.
    packed_weight: ClassVar[bool] = False
    #: What TorchScript's constant folding computes into an anonymous ``onnx::<Op>_N`` weight ("": none).
    torchscript_fold: ClassVar[str] = ""
    #: Whether the table must equal its PyTorch parameter exactly (embeddings: no fold factor applies).
    exact_parameter: ClassVar[bool] = False

    def site(self, node: ir.Node) -> Site | str:
        """``node`` (of a main graph, read through its use-def chains) as a site, or the reason it cannot
        take a branch."""
        raise NotImplementedError

    def source_layout(self, site: Site) -> str:
        """The source initializer's layout relative to the form's delta (:mod:`lora_onnx.kinds.deltas`)."""
        node_is_out_in = site.layout == "out,in"
        return "out,in" if node_is_out_in != site.weight.transposed else "in,out"

    def rank_bounds(self, site: Site) -> tuple[int, int]:
        """(min, max) of the sides of the site's weight as a matrix; ranks that add capacity end at min."""
        return min(site.in_features, site.out_features), max(site.in_features, site.out_features)

    def batch_rows(self, site: Site, value: np.ndarray, rows: int) -> np.ndarray | str:
        """``value`` (the site's data input in a probe run) as one block per batch row, or why not."""
        width = site.in_features
        if value.ndim == 0 or value.size % (rows * width):
            return f"its {value.size} values do not split into {rows} rows of {width}-wide vectors"
        return value.reshape(rows, -1, width)

    def batched_input(self, shapes: Sequence[tuple[int, ...]]) -> bool:
        """Whether a probed data input already is [batch, tokens, in] (the mixed branch skips reshapes)."""
        return False

    def output_width(self, node: ir.Node) -> int | None:
        """The last dim of the node's output from its attributes and the dims of its initializer inputs,
        without a site scan; None when the kind cannot tell."""
        return None

    def torch_transposed(self, site: Site) -> bool:
        """Whether the source weight is the PyTorch parameter transposed (a MatMul's (in, out) Linear)."""
        return False

    # -- PEFT
    def peft_shapes(self, site: Site, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of PEFT's lora_A / lora_B for this site: (r, in), (out, r) for dense modules."""
        return (rank, site.in_features), (site.out_features, rank)

    def peft_rank_refusal(self, site: Site, rank: int) -> str | None:
        return None

    def peft_magnitude_shape(self, site: Site) -> tuple[int, ...]:
        return (site.out_features,)

    def peft_base_shape(self, site: Site) -> tuple[int, ...]:
        """The shape PEFT saves the module's base weight in."""
        return (site.out_features, site.in_features)

    def from_peft(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PEFT's A / B in this kind's storage layouts (dense: transposed)."""
        return a.T, b.T

    def peft_groups(self, site: Site) -> tuple[int, int]:
        """(a_group, b_group) of a branch made from PEFT's tensors."""
        return 1, 1

    def to_peft(self, a: np.ndarray, b: np.ndarray, record: BranchRecord) -> tuple[np.ndarray, np.ndarray]:
        """The branch's stored A / B as PEFT's lora_A / lora_B."""
        return a.T, b.T

    def peft_notes(self, site: Site) -> tuple[str, ...]:
        """Warnings about how PEFT's own forward differs on this site."""
        return ()

    def peft_dora_norm(
        self, weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, site: Site
    ) -> np.ndarray:
        """PEFT's DoRA weight norm per output channel (float32, flat) for this site."""
        raise LoraOnnxError(f"DoRA is not defined for {self.op_type} nodes")

    def base_bias(self, nodes: Mapping[str, ir.Node], site: Site) -> str:
        """The value the base node adds as its bias, "" when it adds none (``nodes``: the graph's nodes by
        name, :func:`lora_onnx.model.graph.nodes_by_name`)."""
        if self.bias_input:
            node = nodes[site.node]
            return name_of(node.inputs[2]) if len(node.inputs) > 2 else ""
        if site.bias_add is not None:
            add = nodes[site.bias_add]
            mm_out = nodes[site.node].outputs[0]
            return name_of(add.inputs[1] if add.inputs[0] is mm_out else add.inputs[0])
        return ""


def float_weight(node: ir.Node, constant_data: str) -> WeightRef | str:
    """The float weight a MatMul / Gemm / Conv-like node reads as its second input, or why it has none
    (``constant_data``: the reason to give when the data input is the constant one)."""
    data, weight_value = node.inputs[0], node.inputs[1]
    if is_constant(data) or not isinstance(resolve_weight(data), str):
        return constant_data
    weight = resolve_weight(weight_value)
    if isinstance(weight, str):
        return weight
    if weight.node_dtype not in FLOAT_TYPES:
        kind = onnx.helper.tensor_dtype_to_np_dtype(weight.node_dtype)
        return (
            f"weight {weight.initializer!r} is {kind}: an integer {node.op_type} is no float op, and a LoRA "
            "branch computes in float (its values would truncate to integers)"
        )
    return weight


_KINDS: dict[str, OpKind] = {}
_FORMS: dict[str, BranchForm] = {}


def register(kind: OpKind) -> OpKind:
    """Add ``kind`` (and its form) to the registry; each kind module registers its kind on import."""
    _KINDS[kind.op_type] = kind
    _FORMS[kind.form.name] = kind.form
    return kind


def all_kinds() -> tuple[OpKind, ...]:
    _load()
    return tuple(_KINDS.values())


def kind_of(op: str) -> OpKind:
    """The kind of op type ``op`` (a Site's or a BranchRecord's ``op``)."""
    _load()
    try:
        return _KINDS[op]
    except KeyError:
        raise LoraOnnxError(f"lora-onnx has no op kind {op!r} (it knows {', '.join(_KINDS)})") from None


def kind_for_node(node: ir.Node | onnx.NodeProto) -> OpKind | None:
    """The kind of ``node`` (an onnx-ir node or a NodeProto) when its op type and domain are one's, else
    None."""
    _load()
    kind = _KINDS.get(node.op_type)
    return kind if kind is not None and node.domain in kind.domains else None


def form_of(name: str) -> BranchForm:
    """The branch form recorded as ``BranchRecord.kind`` ``name``."""
    _load()
    try:
        return _FORMS[name]
    except KeyError:
        raise LoraOnnxError(f"lora-onnx has no branch form {name!r} (it knows {', '.join(_FORMS)})") from None


def _load() -> None:
    # The kind modules register themselves; importing the package imports them all.
    if not _KINDS:
        import lora_onnx.kinds  # noqa: F401
