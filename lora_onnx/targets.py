"""Select modules by name the way PEFT does, so one recipe means the same thing here and in PyTorch.

- a list of names matches a module path equal to an entry or ending in ``"." + entry``;
- a regex (a string in PEFT's ``target_modules``) must match the whole path (``re.fullmatch``);
- rank and alpha patterns: the first key ``k`` (in order) with ``re.match(rf"(.*\\.)?({k})$", path)`` wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lora_onnx.errors import TargetError


def name_matches(path: str, names: Iterable[str]) -> bool:
    """True when ``path`` equals one of ``names`` or ends in ``.name`` (PEFT's list matching)."""
    return any(path == name or path.endswith("." + name) for name in names)


def compile_regex(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TargetError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from exc


@dataclass(frozen=True)
class TargetSelector:
    """Which module paths get a branch: targets (names or a regex) minus excludes (names or a regex)."""

    names: tuple[str, ...] = ()
    regex: str | None = None
    exclude: tuple[str, ...] = ()
    exclude_regex: str | None = None

    def __post_init__(self) -> None:
        for pattern, what in ((self.regex, "--target-regex"), (self.exclude_regex, "--exclude-regex")):
            if pattern is not None:
                compile_regex(pattern, what)

    @property
    def selects_everything(self) -> bool:
        return not self.names and self.regex is None

    def selects(self, path: str) -> bool:
        if self.exclude and name_matches(path, self.exclude):
            return False
        if self.exclude_regex is not None and re.fullmatch(self.exclude_regex, path):
            return False
        if self.selects_everything:
            return True
        if self.names and name_matches(path, self.names):
            return True
        return self.regex is not None and re.fullmatch(self.regex, path) is not None

    def describe(self) -> str:
        parts = [*self.names, *([f"regex {self.regex!r}"] if self.regex else [])]
        return ", ".join(parts) if parts else "all supported sites"


def pattern_value(path: str, patterns: Mapping[str, float], default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key whose regex ends the path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
