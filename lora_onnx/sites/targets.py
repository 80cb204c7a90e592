"""Select modules by name the way PEFT does, so one recipe means the same thing here and in PyTorch.

The one implementation of PEFT's matching rules (``check_target_module_exists``); recipes, plans and the
PEFT import all ask it:

- a list of names matches a module path equal to an entry or ending in ``"." + entry``;
- a regex (a string in PEFT's ``target_modules``) must match the whole path (``re.fullmatch``);
- ``exclude_modules``: the same two rules, checked first;
- ``layers_to_transform`` / ``layers_pattern`` (:class:`PeftTargetSelector`): a path matched by a name
  suffix must also have its first numbered segment (after a ``layers_pattern``) in the listed layers;
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


def module_matches(path: str, names: Iterable[str] = (), regex: str | None = None) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` rule: a listed name (see :func:`name_matches`)
    or a regex matching the whole path."""
    return name_matches(path, names) or (regex is not None and re.fullmatch(regex, path) is not None)


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

    def excludes(self, path: str) -> bool:
        """True when ``path`` is excluded (PEFT's ``exclude_modules``), whatever the targets say."""
        return module_matches(path, self.exclude, self.exclude_regex)

    def selects(self, path: str) -> bool:
        if self.excludes(path):
            return False
        return self.selects_everything or module_matches(path, self.names, self.regex)

    def describe(self) -> str:
        parts = [*self.names, *([f"regex {self.regex!r}"] if self.regex else [])]
        return ", ".join(parts) if parts else "all supported sites"


@dataclass(frozen=True)
class PeftTargetSelector(TargetSelector):
    """:class:`TargetSelector` plus PEFT's layer filter and ``modules_to_save``, in PEFT's order.

    PEFT (``check_target_module_exists``): excluded modules first, then ``modules_to_save`` and their
    children, then the targets. A regex target or a path *equal* to a listed name is taken as is; a path
    matched by ``.name`` suffix must also have its first numbered segment (after ``layers_pattern`` when
    given) in ``layers``. With no target at all (a native recipe), the layer filter applies to every path.
    """

    layers: tuple[int, ...] = ()
    layers_pattern: tuple[str, ...] = ()
    protected: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for pattern in self.layers_pattern:
            compile_regex(pattern, "layers_pattern")

    @property
    def selects_everything(self) -> bool:
        return super().selects_everything and not self.layers and not self.protected

    def selects(self, path: str) -> bool:
        if self.excludes(path):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in self.protected):
            return False
        if path in self.names or module_matches(path, regex=self.regex):
            return True
        if self.names and not name_matches(path, self.names):
            return False
        if not self.names and self.regex is not None:
            return False
        return self.in_layers(path)

    def in_layers(self, path: str) -> bool:
        """PEFT's layer filter: the first numbered segment (after a ``layers_pattern``) is in ``layers``."""
        if not self.layers:
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
                if match is not None:
                    break
        return match is not None and int(match.group("idx")) in self.layers

    def describe(self) -> str:
        text = super().describe()
        if self.layers:
            within = f" under {'/'.join(self.layers_pattern)}" if self.layers_pattern else ""
            text += f" in layers {list(self.layers)}{within}"
        return text


def pattern_value(path: str, patterns: Mapping[str, float], default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key whose regex ends the path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
