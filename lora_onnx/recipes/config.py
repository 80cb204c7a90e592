"""What the user asks for: the recipe of a fresh adapter (rank, alpha, targets, init)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lora_onnx.common.constants import DEFAULT_ADAPTER, INIT_KINDS
from lora_onnx.common.finite import check_seed, finite_number
from lora_onnx.errors import LoraOnnxError
from lora_onnx.sites.find import DEFAULT_OPS, OP_KEYS
from lora_onnx.sites.targets import TargetSelector, compile_regex, pattern_value

#: The largest float32: an alpha (and so a scale) beyond it is inf in the graph.
FLOAT32_MAX = 3.4028234663852886e38
#: PEFT's default rank ``r``; never refused for being above a site's size (see lora_onnx.recipes.plan).
DEFAULT_RANK = 8


@dataclass(frozen=True)
class LoraConfig:
    """A fresh adapter's recipe, with PEFT's meaning for every field.

    ``alpha`` defaults to ``rank``; the scale is ``alpha / rank`` (``alpha / sqrt(rank)`` with
    ``use_rslora``). ``init``: ``default`` (PEFT: A kaiming-uniform, B = 0, outputs unchanged),
    ``gaussian`` (A ~ N(0, 1/r), B = 0) or ``random`` (A and B both non-zero), reproducible by ``seed``.
    """

    rank: int = DEFAULT_RANK
    alpha: float | None = None
    use_rslora: bool = False
    targets: TargetSelector = field(default_factory=TargetSelector)
    ops: frozenset[str] = DEFAULT_OPS
    init: str = "default"
    seed: int = 0
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    adapter_name: str = DEFAULT_ADAPTER

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", frozenset(self.ops))
        # Private copies (plain dicts, so configs pickle for batch's worker processes).
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        _check_rank(self.rank, "--rank")
        if self.alpha is not None and not (0 < self.alpha <= FLOAT32_MAX):
            # the scale alpha / r is a float32 in the graph: a larger alpha would make it inf
            raise LoraOnnxError(
                f"--alpha must be a positive number (at most {FLOAT32_MAX:.4g}), got {self.alpha}"
            )
        unknown = self.ops - set(OP_KEYS)
        if unknown or not self.ops:
            raise LoraOnnxError(f"--ops takes a comma list of {', '.join(OP_KEYS)}; got {sorted(self.ops)}")
        check_seed(self.seed)
        if self.init not in INIT_KINDS:
            raise LoraOnnxError(f"--init must be one of {', '.join(INIT_KINDS)}, got {self.init!r}")
        for key, value in self.rank_pattern.items():
            compile_regex(key, "rank_pattern key")
            _check_rank(value, f"rank_pattern[{key!r}]")
        for key, value in self.alpha_pattern.items():
            compile_regex(key, "alpha_pattern key")
            if finite_number(value, f"alpha_pattern[{key!r}]", positive=True) > FLOAT32_MAX:
                raise LoraOnnxError(f"alpha_pattern[{key!r}] must be at most {FLOAT32_MAX:.4g}, got {value}")
        if not self.adapter_name or not self.adapter_name.replace("_", "").replace("-", "").isalnum():
            raise LoraOnnxError(f"adapter name {self.adapter_name!r} must be letters, digits, '_' or '-'")

    def rank_for(self, path: str) -> int:
        return int(pattern_value(path, self.rank_pattern, self.rank))

    def alpha_for(self, path: str) -> float:
        """The site's alpha; without --alpha it is the site's own rank, so the scale is 1."""
        default = self.alpha if self.alpha is not None else self.rank_for(path)
        return float(pattern_value(path, self.alpha_pattern, default))

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _check_rank(rank: object, what: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraOnnxError(f"{what} must be a positive whole number, got {rank!r}")
