"""The one "nearest name" helper behind every "did you mean" / "nearest module paths" hint."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def nearest(
    name: str, candidates: Iterable[str], *, n: int = 3, cutoff: float = 0.6, dotted: bool = False
) -> list[str]:
    """The candidates closest to ``name`` (difflib's ratio, at least ``cutoff``), best first, at most ``n``.

    ``dotted`` treats the candidates as module paths, where the last component says the most: paths
    ending in ``name``'s last component come first, then one path per close last component (the one
    closest to the whole of ``name``), then close whole paths; failing all, the first ``n`` paths, so a
    hint about a typo is never empty while there are paths to show.
    """
    pool = list(dict.fromkeys(candidates))
    if not dotted:
        return difflib.get_close_matches(name, pool, n=n, cutoff=cutoff)
    tail = name.rsplit(".", 1)[-1]
    by_tail: dict[str, list[str]] = {}
    for path in pool:
        by_tail.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    if tail in by_tail:
        return difflib.get_close_matches(name, by_tail[tail], n=n, cutoff=0.0)
    close = difflib.get_close_matches(tail, list(by_tail), n=n, cutoff=min(cutoff, 0.5))
    found = [_closest(name, by_tail[t]) for t in close]
    return found or difflib.get_close_matches(name, pool, n=n, cutoff=0.3) or pool[:n]


def _closest(name: str, paths: list[str]) -> str:
    """The path most like ``name``; the first of equals, so the hint follows the graph's order."""
    return max(paths, key=lambda path: difflib.SequenceMatcher(None, name, path).ratio())
