"""Progress of long steps (reading a graph, writing data, validation runs), for whoever listens.

Library code marks a step with :func:`step` and advances it; nothing is shown unless a caller installed a
:class:`Reporter` with :func:`reporting` (the command line draws rich progress bars on a terminal). The
default costs one context-variable lookup per step, and this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class Reporter(Protocol):
    """Receives the steps of the library's long work."""

    def start(self, description: str, total: float | None, unit: str = "") -> int:
        """A step began; its id. ``total``: its size in the unit of :meth:`advance` (None if unknown);
        ``unit``: ``"bytes"``, or ``""`` for a count (models, runs)."""
        ...

    def advance(self, task: int, amount: float) -> None:
        """``amount`` more of step ``task`` is done."""
        ...

    def finish(self, task: int) -> None:
        """Step ``task`` ended (done, or abandoned by an error)."""
        ...


_reporter: ContextVar[Reporter | None] = ContextVar("lora_onnx_progress", default=None)


def _ignore(amount: float = 1) -> None:
    pass


@contextmanager
def step(description: str, total: float | None = None, unit: str = "") -> Iterator[Callable[[float], None]]:
    """Report a long step; yields ``advance(amount=1)``. Silent unless a reporter is installed."""
    reporter = _reporter.get()
    if reporter is None:
        yield _ignore
        return
    task = reporter.start(description, total, unit)

    def advance(amount: float = 1) -> None:
        reporter.advance(task, amount)

    try:
        yield advance
    finally:
        reporter.finish(task)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send the steps of the work inside the ``with`` block to ``reporter`` (None: silence)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)
