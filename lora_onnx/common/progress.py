"""Progress of long steps (reading a graph, writing data, validation runs), for whoever listens.

Library code marks a step with :func:`step` and advances it; nothing is shown unless a caller installed a
:class:`Reporter` with :func:`reporting` (the command line draws rich progress bars on a terminal). The
default costs one context-variable lookup per step, and this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterator
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

    def describe(self, task: int, description: str) -> None:
        """Step ``task`` is now doing ``description`` (e.g. the model a batch converts)."""
        ...

    def finish(self, task: int) -> None:
        """Step ``task`` ended (done, or abandoned by an error)."""
        ...


_reporter: ContextVar[Reporter | None] = ContextVar("lora_onnx_progress", default=None)


class Step:
    """What :func:`step` yields: call it to advance, ``describe`` to say what it is doing now."""

    def __init__(self, reporter: Reporter | None = None, task: int = 0) -> None:
        self._reporter = reporter
        self._task = task

    def __call__(self, amount: float = 1) -> None:
        if self._reporter is not None:
            self._reporter.advance(self._task, amount)

    def describe(self, description: str) -> None:
        if self._reporter is not None:
            self._reporter.describe(self._task, description)


@contextmanager
def step(description: str, total: float | None = None, unit: str = "") -> Iterator[Step]:
    """Report a long step; yields a :class:`Step` (``advance(amount=1)``). Silent unless a reporter is
    installed."""
    reporter = _reporter.get()
    if reporter is None:
        yield Step()
        return
    task = reporter.start(description, total, unit)
    try:
        yield Step(reporter, task)
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
