"""Batch throughput: the bundled models, copied a few times, converted with --jobs 1, 2, ... in one run.

Usage (from the repository root)::

    python scripts/bench_batch.py [--copies 4] [--jobs 1 2] [--validate] [--merge] [--rank 8]

Each configuration converts the same folder into a fresh output folder (inject with a random-init
recipe, optionally proven and folded) --repeat times. Reported: the first run ("cold": for --jobs > 1 it
includes starting the fork server, which a CLI run pays once), the median of the runs ("warm") in
seconds and models per second, and the warm speed-up over the first --jobs value.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lora_onnx import LoraConfig  # noqa: E402
from lora_onnx.commands.batch import BatchOptions, available_cpus, run_batch  # noqa: E402

BUNDLED = ("convnet", "tiny_bert", "tiny_gpt2", "tiny_llama")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=4, help="copies of each bundled model (default 4)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="--jobs values to compare")
    parser.add_argument("--validate", action="store_true", help="prove every model in onnxruntime")
    parser.add_argument("--merge", action="store_true", help="fold the branches into the weights")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5, help="runs per --jobs value (default 5)")
    args = parser.parse_args()

    options = BatchOptions(
        LoraConfig(rank=args.rank, init="random", rank_pattern={"depthwise": 32}),
        validate=args.validate,
        merge=args.merge,
    )
    with tempfile.TemporaryDirectory(prefix="lora-onnx-bench-") as scratch:
        inputs = Path(scratch) / "in"
        for copy in range(args.copies):
            for name in BUNDLED:
                shutil.copytree(REPO / "models" / name, inputs / f"{name}_{copy}")
        count = args.copies * len(BUNDLED)
        steps = ["inject"] + (["merge"] if args.merge else []) + (["validate"] if args.validate else [])
        print(f"{count} models, {' + '.join(steps)}, rank {args.rank}, {available_cpus()} CPUs")
        print(f"{'jobs':>4} {'cold s':>7} {'warm s':>7} {'models/s':>9} {'speed-up':>9}")
        baseline = None
        for jobs in args.jobs:
            walls = []
            for run in range(args.repeat):
                out = Path(scratch) / f"out_{jobs}_{run}"
                start = time.perf_counter()
                report = run_batch([inputs], out, options, jobs=jobs)
                walls.append(time.perf_counter() - start)
                if not report.ok:
                    print(report.summary(), file=sys.stderr)
                    return 1
                shutil.rmtree(out)
            warm = statistics.median(walls)
            baseline = baseline or warm
            print(f"{jobs:>4} {walls[0]:>7.2f} {warm:>7.2f} {count / warm:>9.1f} {baseline / warm:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
