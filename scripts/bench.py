"""Benchmark lora-onnx on a synthetic decoder of a chosen size (default over 2 GB, stored as external data).

Reports, side by side in one run:

- file operations, each in its own subprocess (wall time of the operation and the process's peak RSS):
  ``cp`` of the data file, ``onnx.load`` + ``onnx.save`` of the model (with external data), our inject
  and our merge at each rank;
- onnxruntime CPU latency of base vs injected vs merged at each rank, each candidate measured in one
  process together with the base (runs alternate, so drift and other load hit both alike), with the
  FLOP overhead a branch should cost: ``2 r (in + out)`` per token and projection against ``2 in out``.

Usage (from the repository root)::

    python scripts/bench.py [--size-gb 2.5] [--hidden 2048] [--layers N] [--ranks 8,16,64]
                            [--tokens 32] [--runs 10] [--workdir DIR] [--cold] [--json FILE]

Disk: the base model, one extra full copy at a time (cp, onnx.save, an injected or a merged model);
the run refuses to start with less than 3.5x the data size free. The temporary folder (under /work by
default, as /tmp may be small) is removed at the end unless ``--keep``. lora-onnx's writes are durable
(each file is fsynced before it is renamed into place), which ``cp`` and ``onnx.save`` are not, so the
table also times ``cp`` followed by an fsync of the copy, the fair baseline for a merge; outputs are
fsynced between measurements so one write-back does not slow the next. Page caches are warm unless
``--cold``, which evicts the input files (fsync + ``posix_fadvise(DONTNEED)``, only our files) before
every operation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the synthetic model builder lives with the tests

from synthetic import DecoderSpec, build_decoder, spec_for_size  # noqa: E402

# ---- what each subprocess runs ---------------------------------------------------------------------

_PRELUDE = """
import json, os, resource, subprocess, sys, time
args = json.loads(sys.argv[1])
def rss_mb(who=resource.RUSAGE_SELF):
    # Linux keeps ru_maxrss across execve, so a fresh interpreter would report its parent's (the bench's)
    # peak; VmHWM is this process's own.
    if who == resource.RUSAGE_SELF and os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024
def cpu_s(who=resource.RUSAGE_SELF):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
"""

_OPS = {
    "cp": """
start = time.perf_counter()
subprocess.run(["cp", args["source"], args["target"]], check=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cpu_s": cpu_s(resource.RUSAGE_CHILDREN),
                  "peak_mb": rss_mb(resource.RUSAGE_CHILDREN), "baseline_mb": 0}))
""",
    "cp_fsync": """
start = time.perf_counter()
subprocess.run(["cp", args["source"], args["target"]], check=True)
fd = os.open(args["target"], os.O_RDONLY)
os.fsync(fd)
os.close(fd)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cpu_s": cpu_s(resource.RUSAGE_CHILDREN) + cpu_s(),
                  "peak_mb": rss_mb(resource.RUSAGE_CHILDREN), "baseline_mb": 0}))
""",
    "onnx_roundtrip": """
import onnx
baseline, cpu0 = rss_mb(), cpu_s()
start = time.perf_counter()
model = onnx.load(args["source"])
onnx.save(model, args["target"], save_as_external_data=True, all_tensors_to_one_file=True,
          location=os.path.basename(args["target"]) + ".data")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cpu_s": cpu_s() - cpu0, "peak_mb": rss_mb(), "baseline_mb": baseline}))
""",
    "inject": """
# lora_onnx's API is imported on first use: import it before the clock starts (it is start-up, not work)
from lora_onnx import LoraConfig, inject
baseline, cpu0 = rss_mb(), cpu_s()
start = time.perf_counter()
result = inject(args["source"], LoraConfig(rank=args["rank"], init="random"),
                output=args["target"], link_data=args.get("link_data", False))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cpu_s": cpu_s() - cpu0, "peak_mb": rss_mb(), "baseline_mb": baseline,
                  "branches": len(result.branches)}))
""",
    "merge": """
from lora_onnx import merge  # before the clock, as for inject
baseline, cpu0 = rss_mb(), cpu_s()
start = time.perf_counter()
result = merge(args["source"], output=args["target"])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cpu_s": cpu_s() - cpu0, "peak_mb": rss_mb(), "baseline_mb": baseline,
                  "folded": len(result.folded)}))
""",
    "latency": """
import numpy as np, onnxruntime as ort
def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = args["threads"]
    options.log_severity_level = 3
    start = time.perf_counter()
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - start
(base, base_load), (cand, cand_load) = session(args["base"]), session(args["candidate"])
ids = np.random.default_rng(0).integers(0, args["vocab"], size=(args["batch"], args["tokens"]))
feeds = {"input_ids": ids.astype(np.int64)}
for _ in range(args["warmup"]):
    base.run(None, feeds); cand.run(None, feeds)
times = {"base": [], "candidate": []}
cpu = {"base": [], "candidate": []}
for i in range(args["runs"]):
    order = [("base", base), ("candidate", cand)] if i % 2 == 0 else [("candidate", cand), ("base", base)]
    for name, sess in order:
        start, start_cpu = time.perf_counter(), time.thread_time()
        sess.run(None, feeds)
        times[name].append(time.perf_counter() - start)
        cpu[name].append(time.thread_time() - start_cpu)
loads = {"base": base_load, "candidate": cand_load}
print(json.dumps({"times": times, "cpu": cpu, "load_s": loads, "peak_mb": rss_mb()}))
""",
}


def run_op(op: str, **kwargs: Any) -> dict[str, Any]:
    """Run one operation in a fresh interpreter; its own report plus the process's total wall time."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PRELUDE + _OPS[op], json.dumps(kwargs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: {op} failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["process_seconds"] = time.perf_counter() - start
    return report


# ---- file system helpers ---------------------------------------------------------------------------


def files_of(model: Path) -> list[Path]:
    return sorted(p for p in model.parent.iterdir() if p.name.startswith(model.name))


def settle(paths: list[Path], evict: bool) -> None:
    """fsync ``paths`` (outside any timed region); with ``evict``, drop them from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if evict and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(model: Path) -> None:
    shutil.rmtree(model.parent, ignore_errors=True)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


# ---- the run ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-gb", type=float, default=2.5, help="data size in GB (10^9 bytes; default 2.5)"
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: as many as --size-gb needs)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, help="MLP width (default ~8/3 hidden, rounded to 256)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--ranks", default="8,16,64", help="comma-separated LoRA ranks (default 8,16,64)")
    parser.add_argument("--tokens", type=int, default=32, help="sequence length of a latency run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=12, help="timed runs per model and pairing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads (default 1: runs on the calling thread, so its CPU time is the "
        "run's cost even on a busy machine; with more, only wall times are meaningful)",
    )
    parser.add_argument("--workdir", type=Path, help="temporary folder (default: a new one under /work)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--cold", action="store_true", help="evict input files from the page cache first")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    return parser.parse_args(argv)


def make_spec(args: argparse.Namespace) -> DecoderSpec:
    spec = spec_for_size(
        args.size_gb,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        vocab=args.vocab,
        dtype=args.dtype,
        layers=args.layers,
    )
    return spec


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    spec = make_spec(args)
    root = args.workdir or (Path("/work") if Path("/work").is_dir() else Path(tempfile.gettempdir()))
    root.mkdir(parents=True, exist_ok=True)
    need = int(spec.data_bytes * 3.5)
    if free_bytes(root) < need:
        raise SystemExit(
            f"bench: {root} has {free_bytes(root) / 1e9:.1f} GB free; this run needs about "
            f"{need / 1e9:.1f} GB (use --workdir elsewhere or a smaller --size-gb)"
        )
    work = Path(tempfile.mkdtemp(prefix="lora-bench-", dir=root))
    results: dict[str, Any] = {
        "spec": spec.__dict__ | {"params": spec.params, "data_bytes": spec.data_bytes},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_start": os.getloadavg(),
        },
        "settings": {
            "ranks": ranks, "tokens": args.tokens, "batch": args.batch, "runs": args.runs,
            "threads": args.threads, "page_cache": "cold (inputs evicted)" if args.cold else "warm",
        },
    }  # fmt: skip
    try:
        results |= run_benchmark(args, spec, ranks, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def run_benchmark(
    args: argparse.Namespace, spec: DecoderSpec, ranks: list[int], work: Path
) -> dict[str, Any]:
    import onnxruntime

    out: dict[str, Any] = {"versions": {"onnxruntime": onnxruntime.__version__}}
    base = work / "base" / "model.onnx"
    start = time.perf_counter()
    build_decoder(base, spec)
    out["build_seconds"] = time.perf_counter() - start
    data = base.with_name("model.onnx.data")
    out["data_file_bytes"] = data.stat().st_size
    settle(files_of(base), evict=args.cold)
    print(
        f"bench: built {spec} ({data.stat().st_size / 1e9:.2f} GB) in {out['build_seconds']:.1f} s",
        file=sys.stderr,
    )

    ops: list[dict[str, Any]] = []

    def measure(
        label: str, op: str, inputs: list[Path], output: Path | None, **kwargs: Any
    ) -> dict[str, Any]:
        settle(inputs, evict=args.cold)
        report = run_op(op, **kwargs)
        if output is not None:
            settle([p for p in output.parent.iterdir() if p.is_file()], evict=False)
        report["label"] = label
        ops.append(report)
        print(f"bench: {label}: {report['seconds']:.2f} s, peak {report['peak_mb']:.0f} MB", file=sys.stderr)
        return report

    copy = work / "copy" / "model.onnx.data"
    copy.parent.mkdir()
    measure("cp (data file)", "cp", [data], copy, source=str(data), target=str(copy))
    remove(copy)
    copy.parent.mkdir()
    measure("cp + fsync (durable copy)", "cp_fsync", [data], copy, source=str(data), target=str(copy))
    remove(copy)
    # before any hard link exists: onnx >= 1.21's onnx.load refuses data files with several links
    roundtrip = work / "roundtrip" / "model.onnx"
    roundtrip.parent.mkdir()
    measure(
        "onnx.load + onnx.save",
        "onnx_roundtrip",
        files_of(base),
        roundtrip,
        source=str(base),
        target=str(roundtrip),
    )
    remove(roundtrip)

    # How an injected output gets the base's unchanged data: beside the base it refers to the base's data
    # file (nothing copied); in another folder it gets a clone (reflink) where the file system has one,
    # else a copy (the rank loop below); hard links only on request (--link-data).
    beside = base.with_name("lora.onnx")
    measure(f"lora-onnx inject beside the base (r={ranks[0]})", "inject", files_of(base), beside,
            source=str(beside.with_name("model.onnx")), target=str(beside), rank=ranks[0])  # fmt: skip
    for path in files_of(beside):
        path.unlink()
    linked = work / "linked" / "model.onnx"
    measure(f"lora-onnx inject --link-data (r={ranks[0]})", "inject", files_of(base), linked,
            source=str(base), target=str(linked), rank=ranks[0], link_data=True)  # fmt: skip
    remove(linked)

    latency: list[dict[str, Any]] = []
    for rank in ranks:
        injected = work / f"lora{rank}" / "model.onnx"
        merged = work / f"merged{rank}" / "model.onnx"
        measure(
            f"lora-onnx inject, other folder: copy (r={rank})",
            "inject",
            files_of(base),
            injected,
            source=str(base),
            target=str(injected),
            rank=rank,
        )
        measure(
            f"lora-onnx merge (r={rank})",
            "merge",
            files_of(injected),
            merged,
            source=str(injected),
            target=str(merged),
        )
        if not args.skip_latency:
            for kind, candidate in (("injected", injected), ("merged", merged)):
                report = run_op(
                    "latency", base=str(base), candidate=str(candidate), vocab=spec.vocab, batch=args.batch,
                    tokens=args.tokens, runs=args.runs, warmup=args.warmup, threads=args.threads,
                )  # fmt: skip
                report |= {"rank": rank, "kind": kind}
                latency.append(report)
                base_ms, cand_ms = (1e3 * median(report["times"][k]) for k in ("base", "candidate"))
                print(
                    f"bench: latency r={rank} {kind}: {cand_ms:.1f} ms vs base {base_ms:.1f} ms",
                    file=sys.stderr,
                )
        remove(merged)
        remove(injected)
    out["operations"] = ops
    out["latency"] = latency
    out["flop_overhead"] = {
        str(r): spec.lora_flops_per_token(r) / spec.linear_flops_per_token() for r in ranks
    }
    return out


# ---- report ----------------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    spec = results["spec"]
    data_mb = results["data_file_bytes"] / 1e6
    ops = {op["label"]: op for op in results["operations"]}
    cp_s = ops["cp (data file)"]["seconds"]
    durable_s = ops["cp + fsync (durable copy)"]["seconds"]
    roundtrip_s = ops["onnx.load + onnx.save"]["seconds"]
    lines = [
        f"Synthetic decoder: {spec['layers']} layers, hidden {spec['hidden']}, MLP {spec['intermediate']}, "
        f"vocab {spec['vocab']}, {spec['dtype']}: {spec['params'] / 1e6:,.0f} M parameters, data file "
        f"{data_mb / 1e3:.2f} GB. {results['machine']['cpus']} CPUs, onnxruntime "
        f"{results['versions']['onnxruntime']}, page cache {results['settings']['page_cache']}, load average "
        f"{results['machine']['load_average_start'][0]:.1f} at start.",
        "",
        "| operation | wall (s) | vs cp | vs cp + fsync | vs onnx load+save | CPU (s) | peak RSS (MB) "
        "| peak / data |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, op in ops.items():
        lines.append(
            f"| {label} | {op['seconds']:.2f} | {op['seconds'] / cp_s:.2f}x | "
            f"{op['seconds'] / durable_s:.2f}x | {op['seconds'] / roundtrip_s:.1%} | {op['cpu_s']:.2f} | "
            f"{op['peak_mb']:,.0f} | {op['peak_mb'] / data_mb:.1%} |"
        )
    if results["latency"]:
        settings = results["settings"]
        single = settings["threads"] == 1
        measure = "CPU time of the calling thread" if single else "wall time"
        lines += [
            "",
            f"onnxruntime CPU latency, batch {settings['batch']} x {settings['tokens']} tokens, "
            f"{settings['threads']} thread(s); each candidate runs alternately with the base in one process "
            f"({settings['runs']} runs each). Ratios use the median {measure} per run"
            + ("; wall-time medians are shown for reference." if single else "."),
            "",
            "| model | rank | FLOP overhead | base (ms) | model (ms) | ratio | target | met "
            "| wall base / model (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|:---:|---:|",
        ]
        for entry in results["latency"]:
            overhead = results["flop_overhead"][str(entry["rank"])]
            key = "cpu" if single else "times"
            base_ms = 1e3 * median(entry[key]["base"])
            cand_ms = 1e3 * median(entry[key]["candidate"])
            ratio = cand_ms / base_ms
            bound = 1 + overhead + 0.05 if entry["kind"] == "injected" else 1.03
            wall = [1e3 * median(entry["times"][k]) for k in ("base", "candidate")]
            lines.append(
                f"| {entry['kind']} | {entry['rank']} | {overhead:.2%} | {base_ms:.1f} | {cand_ms:.1f} | "
                f"{ratio:.3f} | <= {bound:.3f} | {'yes' if ratio <= bound else 'no'} | "
                f"{wall[0]:.0f} / {wall[1]:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
