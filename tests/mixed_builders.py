"""Shared pieces of the mixed-batch tests: slotted models with adapter files, per-row onnxruntime runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from swap_builders import load_adapter, run_with, session

from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.commands.swap import fresh_adapter, inject_slots
from lora_onnx.stages.stacked import INDEX_INPUT

#: Inputs whose batch axis is not 0 (swap_builders.mixed_model's ``xt`` is [5, batch]).
BATCH_AXES = {"xt": 1}


def slotted_with_files(
    model: object,
    folder: Path,
    ranks: Sequence[int],
    *,
    exclude: Sequence[str] = (),
    drop: Sequence[str] = (),
) -> tuple[Path, list[Path]]:
    """A slotted copy of ``model`` and one random adapter file per rank (alpha 2r; different seeds).
    The last file leaves out the slots whose tensor names contain one of ``drop``."""
    slots = folder / "slots.onnx"
    inject_slots(model, LoraConfig(rank=2, targets=TargetSelector(exclude=tuple(exclude))), output=slots)
    files = []
    for i, rank in enumerate(ranks):
        tensors = fresh_adapter(slots, LoraConfig(rank=rank, alpha=2.0 * rank, init="random", seed=10 + i))
        if i == len(ranks) - 1 and drop:
            tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
        path = folder / f"adapter_{i}.npz"
        np.savez(path, **tensors)
        files.append(path)
    return slots, files


def rows_alone_with_files(
    slots: Path, files: Sequence[Path], feeds: Mapping[str, np.ndarray], rows: Sequence[int]
) -> list[list[np.ndarray]]:
    """Each batch row run alone through the slotted model, with file ``rows[i]`` active (-1: none).
    Inputs are sliced on axis 0, except those in :data:`BATCH_AXES`."""
    sess = session(slots)
    adapters = {}
    out = []
    for b, r in enumerate(rows):
        row = {k: np.take(v, [b], axis=BATCH_AXES.get(k, 0)) for k, v in feeds.items()}
        if r < 0:
            out.append(run_with(sess, row))
            continue
        if r not in adapters:
            onnx_file = files[r].with_suffix(".onnx_adapter")
            if not onnx_file.exists():
                from lora_onnx.adapters.files import read_adapter_file, write_adapter_file

                write_adapter_file(read_adapter_file(files[r]).tensors, onnx_file)
            adapters[r] = load_adapter(onnx_file)
        out.append(run_with(sess, row, adapters[r]))
    return out


def run_rows(model: object, feeds: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[np.ndarray]:
    """One run of a mixed model with ``rows`` as the adapter index."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)  # type: ignore[attr-defined]
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return sess.run(None, {**feeds, INDEX_INPUT: np.array(rows, np.int64)})
