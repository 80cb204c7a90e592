"""JSON the user hands us (adapter configs, recipes, reports, model metadata), with bounded nesting.

``json.loads`` recurses once per nesting level: a file nested 100,000 deep raises ``RecursionError``
(not a ``ValueError``), and one just under Python's limit can still overflow whoever walks the result.
Nothing lora-onnx reads nests more than a few levels, so :func:`loads` refuses anything deeper than
:data:`MAX_DEPTH` with a :class:`JsonDepthError`, a ``ValueError`` callers already turn into one line.
"""

from __future__ import annotations

import json
from typing import Any

#: Deepest nesting accepted (objects and arrays); real configs and reports use fewer than ten levels.
MAX_DEPTH = 64


class JsonDepthError(ValueError):
    """The document nests objects / arrays deeper than :data:`MAX_DEPTH`."""


def loads(text: str | bytes) -> Any:
    """``json.loads`` that raises :class:`JsonDepthError` (never ``RecursionError``) for deep nesting."""
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise JsonDepthError(f"nested deeper than {MAX_DEPTH} levels") from exc
    check_depth(data)
    return data


def check_depth(data: object) -> None:
    """Raise :class:`JsonDepthError` when ``data`` (parsed JSON or TOML) nests deeper than MAX_DEPTH."""
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:  # iterative: the point is not to recurse
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: list[Any] = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth >= MAX_DEPTH:
            raise JsonDepthError(f"nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
