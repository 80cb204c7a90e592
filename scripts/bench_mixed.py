"""Mixed-adapter batches: one batch of B rows, each with its own adapter, vs runs that switch adapters.

    python scripts/bench_mixed.py [--model models/tiny_llama/model.onnx] [--adapters 4] [--rank 8]
                                  [--batch 1 4 8 16] [--sequence 32] [--rounds 30] [--threads 1]

Builds a slotted model (``inject_slots``, every site), ``--adapters`` random adapter files of ``--rank``
for it, and the mixed model holding them all (``inject_mixed``). Row b of a batch uses adapter
``b % adapters``. Variants, each in its own onnxruntime session (CPU, default optimizations,
``--threads`` intra-op threads), interleaved round by round on the same inputs:

- mixed batch: one run of the mixed model on all B rows with ``lora_adapter_index``;
- one run per row: B runs of the slotted model on one row each, activating that row's adapter file
  (``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter``);
- one run per adapter: the rows grouped by adapter, one slotted run per group (what a server that can
  regroup requests would do);
- base batch: the base model on all B rows, no LoRA (the ceiling).

Prints rows per second (B / median time of one round) as a markdown table, after checking that the
mixed batch equals the rows run one by one (rel <= 1e-4).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

import lora_onnx
from lora_onnx.commands.inject_mixed import inject_mixed
from lora_onnx.commands.swap import fresh_adapter
from lora_onnx.proofs.inputs import make_inputs
from lora_onnx.proofs.validation import input_specs
from lora_onnx.stages.stacked import INDEX_INPUT


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds per round of each variant, interleaved so machine drift hits all alike."""
    for run in variants.values():
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _rows(feeds: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(value[rows]) for name, value in feeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny_llama/model.onnx")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--sequence", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        slots = work / "slots.onnx"
        made = lora_onnx.inject_slots(args.model, lora_onnx.LoraConfig(rank=args.rank), output=slots)
        files = []
        for i in range(args.adapters):
            config = lora_onnx.LoraConfig(rank=args.rank, alpha=2 * args.rank, init="random", seed=i)
            files.append(work / f"adapter_{i}.onnx_adapter")
            fresh_adapter(slots, config, output=files[-1])
        mixed = inject_mixed(slots, files, output=work / "mixed.onnx")
        base_session = _session(Path(args.model), args.threads)
        slots_session = _session(slots, args.threads)
        mixed_session = _session(work / "mixed.onnx", args.threads)
        adapters = []  # RunOptions does not keep a LoraAdapter alive: this list does
        options = []
        for file in files:
            adapters.append(ort.LoraAdapter())
            adapters[-1].Load(str(file))
            options.append(ort.RunOptions())
            options[-1].add_active_adapter(adapters[-1])
        print(
            f"{args.model}: {len(made.branches)} sites, {args.adapters} adapters of rank {args.rank}, "
            f"sequence {args.sequence}, {args.threads} thread(s); rows/s = B / median time of one round"
        )
        print()
        print("| batch B | mixed batch, 1 run | 1 run per row, switching adapters | speed-up "
              "| 1 run per adapter (rows regrouped) | base batch, no LoRA |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|")
        for batch in args.batch:
            feeds = make_inputs(
                input_specs(base_session), {"batch": batch, "sequence": args.sequence}, seed=batch
            )
            index = [b % args.adapters for b in range(batch)]
            mixed_feeds = {**feeds, INDEX_INPUT: np.array(index, np.int64)}
            single = [_rows(feeds, [b]) for b in range(batch)]
            groups = {i: [b for b in range(batch) if index[b] == i] for i in sorted(set(index))}
            grouped = {i: _rows(feeds, rows) for i, rows in groups.items()}

            def per_row(single=single, index=index) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
                return [slots_session.run(None, f, options[i])[0] for f, i in zip(single, index, strict=True)]

            variants = {
                "mixed": lambda mixed_feeds=mixed_feeds: mixed_session.run(None, mixed_feeds),
                "per row": per_row,
                "per adapter": lambda grouped=grouped: [
                    slots_session.run(None, f, options[i]) for i, f in grouped.items()
                ],
                "base": lambda feeds=feeds: base_session.run(None, feeds),
            }
            got = variants["mixed"]()[0]
            want = np.concatenate(per_row())
            rel = float(np.abs(got - want).max() / np.abs(want).max())
            assert rel <= 1e-4, f"mixed batch differs from the rows run alone: rel {rel:.2g}"
            medians = _time(variants, args.rounds)
            rate = {name: batch / (ms / 1e3) for name, ms in medians.items()}
            print(
                f"| {batch} | {rate['mixed']:,.0f} | {rate['per row']:,.0f} | "
                f"{rate['mixed'] / rate['per row']:.1f}x | {rate['per adapter']:,.0f} | {rate['base']:,.0f} |"
            )
        print(f"\nEach mixed batch equalled its rows run one by one ({len(mixed.branches)} mixed sites).")


if __name__ == "__main__":
    main()
