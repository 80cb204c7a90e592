"""What LoRA slots cost at run time: base vs slotted (no adapter, adapter active) vs constant branches.

    python scripts/bench_slots.py [--model models/tiny_llama/model.onnx] [--rank 8] [--runs 300]

Slots go on every site; the adapter is a random-init one of ``--rank``. Each variant runs in its own
onnxruntime session (CPU, default graph optimizations, one intra-op thread for stable numbers) on the
same inputs, interleaved run by run; the table shows the median and 10th-90th percentile latency per
run and the ratio to the base's median. Also checks, as the tests do, that the slotted model with no
adapter equals the base bitwise and with the adapter equals the constant branches.
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
from lora_onnx.proofs.inputs import make_inputs
from lora_onnx.proofs.validation import input_specs


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time(variants: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Milliseconds per run of each variant, interleaved round-robin so machine drift hits all alike."""
    for run in variants.values():
        for _ in range(20):
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny_llama/model.onnx")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--dim", nargs="*", default=["batch=1", "sequence=32"], help="NAME=V input dims")
    args = parser.parse_args()
    config = lora_onnx.LoraConfig(rank=args.rank, init="random", seed=0)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        slots = lora_onnx.inject_slots(
            args.model, config, output=work / "slots.onnx", adapter_output=work / "a.onnx_adapter"
        )
        lora_onnx.save_model(lora_onnx.inject(args.model, config).model, work / "constant.onnx")
        sessions = {
            "base": _session(Path(args.model)),
            "slots": _session(work / "slots.onnx"),
            "constant": _session(work / "constant.onnx"),
        }
        dims = dict(item.split("=") for item in args.dim)
        feeds = make_inputs(input_specs(sessions["base"]), {k: int(v) for k, v in dims.items()})
        adapter = ort.LoraAdapter()
        adapter.Load(str(work / "a.onnx_adapter"))
        active = ort.RunOptions()
        active.add_active_adapter(adapter)
        variants = {
            "base": lambda: sessions["base"].run(None, feeds),
            "slotted, no adapter": lambda: sessions["slots"].run(None, feeds),
            f"slotted, rank-{args.rank} adapter active": lambda: sessions["slots"].run(None, feeds, active),
            f"constant branches, rank {args.rank}": lambda: sessions["constant"].run(None, feeds),
        }
        base_out = variants["base"]()[0]
        assert np.array_equal(variants["slotted, no adapter"]()[0], base_out)
        with_adapter = variants[f"slotted, rank-{args.rank} adapter active"]()[0]
        constant_out = variants[f"constant branches, rank {args.rank}"]()[0]
        rel = float(np.abs(with_adapter - constant_out).max() / np.abs(constant_out).max())
        print(
            f"{args.model}: {len(slots.branches)} slots, inputs { ({k: v.shape for k, v in feeds.items()}) }"
        )
        print(f"no adapter == base bitwise: yes; adapter active vs constant branches: rel {rel:.2g}")
        print(f"{'variant':<36} {'median ms':>10} {'p10-p90 ms':>16} {'vs base':>8}")
        timings = _time(variants, args.runs)
        base_median = statistics.median(timings["base"])
        for name, times in timings.items():
            times = sorted(times)
            median = statistics.median(times)
            spread = f"{times[len(times) // 10]:.3f}-{times[len(times) * 9 // 10]:.3f}"
            print(f"{name:<36} {median:>10.3f} {spread:>16} {median / base_median:>7.2f}x")


if __name__ == "__main__":
    main()
