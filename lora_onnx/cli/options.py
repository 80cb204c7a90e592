"""Options shared by several commands: the adapter recipe, validation settings, output verbosity.

Parsers are built from argparse and :mod:`lora_onnx.common.constants` only (``--help`` stays instant); what a
command needs of the library is imported by the functions that turn options into library objects.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from lora_onnx.common.constants import INIT_KINDS, OP_KEYS
from lora_onnx.errors import LoraOnnxError

if TYPE_CHECKING:
    from lora_onnx.recipes.config import LoraConfig


def _split(value: str, pairs: bool) -> list[str]:
    """``a,b`` -> ``[a, b]``. For KEY=V lists a piece without ``=`` belongs to the next one, so a regex key
    with a comma (``layers\\.[0-9]{1,2}=8``) stays whole."""
    pieces = [piece.strip() for piece in value.split(",")]
    if not pairs:
        return [piece for piece in pieces if piece]
    items: list[str] = []
    pending = ""
    for piece in pieces:
        pending = f"{pending},{piece}" if pending else piece
        if "=" in piece:
            items.append(pending)
            pending = ""
    if pending:
        items.append(pending)
    return items


class ListAction(argparse.Action):
    """A list option: several values after the flag, repeated flags and comma lists all add up
    (``--target q_proj v_proj``, ``--target q_proj --target v_proj``, ``--target q_proj,v_proj``).

    ``pairs``: the values are KEY=VALUE. :func:`reclaim_positionals` keeps such a list from swallowing
    the command's positional arguments.
    """

    def __init__(self, *args: Any, pairs: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(*args, **kwargs)
        self.pairs = pairs

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values if isinstance(values, list) else [values]:
            items.extend(_split(str(value), self.pairs))
        setattr(namespace, self.dest, items)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every (nested) subcommand parser."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from _parsers(sub)


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run something (no subcommands of their own)."""
    return [
        p for p in _parsers(parser) if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    ]


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(".onnx") or "/" in value or os.sep in value or os.path.exists(value)


def reclaim_positionals(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Move positional arguments that follow a list option's values in front of that option.

    argparse lets ``--target q_proj v_proj MODEL`` take MODEL as a third name. A module name never looks
    like a file (a path with a slash, an existing file or folder, a ``.onnx`` name), nor does a KEY=VALUE
    item (it has ``=``), so the list ends at the first value that does, and the rest are positionals:
    ``inspect --target q v MODEL`` becomes ``inspect MODEL --target q v``. Anything else stays a value,
    so a malformed item (``--rank-pattern query``) is still reported as such.
    """
    flags = {
        flag: action.pairs
        for sub in _parsers(parser)
        for action in sub._actions
        if isinstance(action, ListAction)
        for flag in action.option_strings
    }
    args = list(argv)
    kept: list[str] = []
    moved: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--":
            kept.extend(args[i:])
            break
        pairs = flags.get(args[i])
        kept.append(args[i])
        i += 1
        if pairs is None:
            continue
        end = i
        while end < len(args) and not args[end].startswith("-"):
            end += 1
        values = args[i:end]
        cut = next(
            (k for k, v in enumerate(values) if _looks_like_path(v) and not (pairs and "=" in v)), len(values)
        )
        kept.extend(values[:cut])
        moved.extend(values[cut:])
        i = end
    if not moved:
        return kept
    # In front of the first option: after the command words, before any list that could take them.
    first = next(k for k, arg in enumerate(kept) if arg.startswith("-"))
    return [*kept[:first], *moved, *kept[first:]]


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """-q / -v: how much a command prints."""
    group = parser.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", action="store_const", dest="verbosity", const=-1, default=0,
        help="print only errors and the final result line",
    )  # fmt: skip
    group.add_argument(
        "-v", "--verbose", action="store_const", dest="verbosity", const=1,
        help="print details: every skipped node, the time of each long step",
    )  # fmt: skip


def add_recipe_arguments(parser: argparse.ArgumentParser, *, fresh: bool = True) -> None:
    """--rank, --alpha, --target... : a fresh adapter's recipe, with PEFT's meaning.

    ``fresh=False`` leaves out what only sets new tensors' values (--alpha, --rslora, --alpha-pattern,
    --init, --seed, --name), for commands that only look at sites and shapes (inspect).
    """
    group = parser.add_argument_group("adapter recipe (PEFT semantics)")
    group.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r (default 8)")
    if fresh:
        group.add_argument("--alpha", type=float, help="lora_alpha (default: the rank, so the scale is 1)")
        group.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    group.add_argument(
        "--target", action=ListAction, default=[], metavar="NAME",
        help="module names (repeatable, or comma separated): a path equal to NAME or ending in .NAME "
        "(default: every supported site)",
    )  # fmt: skip
    group.add_argument("--target-regex", metavar="RE", help="a regex that must match the whole module path")
    group.add_argument("--exclude", action=ListAction, default=[], metavar="NAME", help="names to leave out")
    group.add_argument("--exclude-regex", metavar="RE", help="a regex of module paths to leave out")
    group.add_argument(
        "--rank-pattern", action=ListAction, pairs=True, default=[], metavar="KEY=R",
        help="per-module rank: the first KEY whose regex ends the module path wins",
    )  # fmt: skip
    if fresh:
        group.add_argument(
            "--alpha-pattern",
            action=ListAction,
            pairs=True,
            default=[],
            metavar="KEY=A",
            help="per-module alpha",
        )
    group.add_argument(
        "--ops",
        default=",".join(OP_KEYS),
        help=f"op types to consider, comma separated (default {','.join(OP_KEYS)})",
    )
    if not fresh:
        return
    group.add_argument(
        "--init", choices=INIT_KINDS, default="default", help="initialisation (default: B = 0)"
    )
    group.add_argument("--seed", type=int, default=0, help="random seed for A/B initialisation")
    group.add_argument("--name", default="default", help="adapter name (several adapters can share a model)")


def _pairs(items: list[str], flag: str, kind: type) -> dict[str, object]:
    pairs: dict[str, object] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        try:
            pairs[key] = kind(value)
        except ValueError:
            key = ""
        if not sep or not key:
            raise LoraOnnxError(f"{flag} takes KEY=VALUE, got {item!r}")
    return pairs


def config_from_args(args: argparse.Namespace) -> LoraConfig:
    from lora_onnx.recipes.config import DEFAULT_ADAPTER, LoraConfig
    from lora_onnx.sites.targets import TargetSelector

    targets = TargetSelector(
        names=tuple(args.target),
        regex=args.target_regex,
        exclude=tuple(args.exclude),
        exclude_regex=args.exclude_regex,
    )
    return LoraConfig(
        rank=args.rank,
        alpha=getattr(args, "alpha", None),
        use_rslora=getattr(args, "rslora", False),
        targets=targets,
        ops=frozenset(op.strip().lower() for op in args.ops.split(",") if op.strip()),
        init=getattr(args, "init", "default"),
        seed=getattr(args, "seed", 0),
        rank_pattern=_pairs(args.rank_pattern, "--rank-pattern", int),  # type: ignore[arg-type]
        alpha_pattern=_pairs(getattr(args, "alpha_pattern", []), "--alpha-pattern", float),  # type: ignore[arg-type]
        adapter_name=getattr(args, "name", DEFAULT_ADAPTER),
    )


#: Where :class:`AdapterSourceAction` records (kind, value) pairs in the order they were given.
ADAPTER_SOURCES = "adapter_sources"


class AdapterSourceAction(argparse.Action):
    """An adapter option (``--peft DIR``, ``--adapter-file FILE``): stores its value like a plain option
    (the last one wins) and records ``(kind, value)`` in order, so ``inject --mixed`` can take several,
    mixed, in the order given (their stack index)."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        recorded = getattr(namespace, ADAPTER_SOURCES, None) or []
        setattr(namespace, ADAPTER_SOURCES, [*recorded, (self.kind, str(values))])


def adapter_sources(args: argparse.Namespace, kind: str | None = None) -> list[tuple[str, str]]:
    """The adapter options given, in order (only those of ``kind`` when given)."""
    return [(k, v) for k, v in getattr(args, ADAPTER_SOURCES, None) or () if kind is None or k == kind]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--providers, --dim, --allow-nonfinite: where and how onnxruntime runs and judges a validation."""
    parser.add_argument(
        "--providers", default="cpu", help="execution providers: cpu, cuda or cpu,cuda (default cpu)"
    )
    parser.add_argument(
        "--dim", action=ListAction, pairs=True, default=[], metavar="NAME=V",
        help="values for symbolic input dims (repeatable, or comma separated)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-nonfinite", action="store_true",
        help="let a validation compare NaN / Inf outputs position by position (NaN where NaN, Inf of the "
        "same sign) instead of failing on them",
    )  # fmt: skip


def dims_from_args(args: argparse.Namespace) -> dict[str, int]:
    """``--dim`` values; refused where no validation runs (they would be ignored without a word)."""
    if args.dim and getattr(args, "validate", True) is False:
        raise LoraOnnxError("--dim sets the symbolic dims of the --validate run's inputs; add --validate")
    from lora_onnx.proofs.inputs import parse_dims

    return parse_dims(args.dim)


#: Where ``--inputs`` lands (batch's positional INPUT... is ``args.inputs``).
INPUTS_DEST = "validation_inputs"


def add_inputs_argument(parser: argparse.ArgumentParser) -> None:
    """--inputs FILE.npz: the validation's input arrays instead of generated ones."""
    parser.add_argument(
        "--inputs", metavar="FILE.npz", dest=INPUTS_DEST,
        help="input arrays named after the graph inputs for the --validate run, instead of generated ones",
    )  # fmt: skip


def inputs_from_args(args: argparse.Namespace) -> str | None:
    """``--inputs``; refused where no validation runs, and beside ``--dim`` (the arrays' shapes apply)."""
    inputs = getattr(args, INPUTS_DEST, None)
    if inputs is None:
        return None
    if not getattr(args, "validate", True):
        raise LoraOnnxError("--inputs feeds the --validate run; add --validate")
    if getattr(args, "dim", None):
        raise LoraOnnxError("--dim shapes generated inputs; with --inputs FILE.npz the arrays' shapes apply")
    return inputs


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--link-data: how an output in another folder gets the base's unchanged external data."""
    parser.add_argument(
        "--link-data", action="store_true",
        help="hard-link the base's external data files into another output folder instead of cloning "
        "(reflink) or copying them: instant, but while the link exists onnx >= 1.21 (onnx.load, checker) "
        "and onnx-ir refuse to load both the output and the input model (onnxruntime accepts them)",
    )  # fmt: skip
    # --copy-data was the opt-out of the old default (hard links); copying is now the default.
    parser.add_argument("--copy-data", action="store_true", help=argparse.SUPPRESS)
