"""Suite-wide set-up: CPU threads per test process, and one copy of each PEFT base export for the whole run.

The suite runs in parallel (pytest-xdist, ``-n auto`` in pyproject's addopts). Every worker is a process of
its own, so per-process caches (tests/peft_cases.py's exports) would be rebuilt by each one; the shared
export folder below makes them once per run instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def _workers() -> int:
    """How many test processes share the machine (1 when the suite runs serially)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or "1")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Each worker gets its share of the CPUs for onnxruntime sessions (lora_onnx.proofs.validation reads
# LORA_ONNX_THREADS), torch and BLAS: with every process using every core, N workers run N x cores spinning
# threads and the parallel suite is slower than the serial one. Set before torch / numpy load their pools;
# a value the caller exported wins.
if _workers() > 1:
    _SHARE = str(max(1, _cpus() // _workers()))
    for _name in ("LORA_ONNX_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _SHARE)


def _run_folder(factory: pytest.TempPathFactory) -> Path:
    """A folder every process of this run shares (xdist workers each have a subfolder of it)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _shared_peft_exports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Base exports of tests/peft_cases.py, made once per run (not once per worker) and reused by all.

    Only an environment variable (peft_cases.SHARED_EXPORTS_ENV), so workers that run no PEFT test never
    import torch for it.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_CASES_SHARED_EXPORTS", str(_run_folder(tmp_path_factory) / "peft_exports"))
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Cases parametrized with the dynamo exporter are slow: its first export of a model takes seconds."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("exporter") == "dynamo":
            item.add_marker(pytest.mark.slow)
