"""``lora-onnx batch``: one recipe over many models, with a report a CI system can gate on."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_onnx.cli import render
from lora_onnx.cli.options import (
    INPUTS_DEST,
    _pairs,
    add_data_arguments,
    add_inputs_argument,
    add_recipe_arguments,
    add_run_arguments,
)
from lora_onnx.cli.render import info, warn
from lora_onnx.common import progress
from lora_onnx.errors import LoraOnnxError

if TYPE_CHECKING:
    from lora_onnx.commands.batch import BatchOptions
    from lora_onnx.commands.reports import BatchReport, ModelReport

#: argparse destinations of recipe and run flags -> recipe option names (see lora_onnx.recipes.files).
_FLAG_KEYS = {
    "rank": "rank",
    "alpha": "alpha",
    "rslora": "rslora",
    "target": "target",
    "target_regex": "target_regex",
    "exclude": "exclude",
    "exclude_regex": "exclude_regex",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "ops": "ops",
    "init": "init",
    "seed": "seed",
    "name": "name",
    "merge": "merge",
    "validate": "validate",
    "providers": "providers",
    "dim": "dims",
    "peft": "peft",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="convert many models with one recipe; per-model report (JSON, JUnit) and exit code for CI",
        description="Apply one recipe to every model of INPUT... (files, folders searched for *.onnx, glob "
        "patterns), writing outputs under OUTDIR in the inputs' layout. A model's failure never stops the "
        "others. With --peft a folder is one export (split files, a genai folder, a pipeline): the "
        "adapter is routed across its files as inject FOLDER --peft does, side files are copied, and the "
        "folder converts whole or not at all. Exit 0 when every model converted (and validated, with "
        "--validate), 1 when some validation disagreed, 2 when some model could not be converted.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="model files, folders or glob patterns")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR", help="folder for the outputs")
    parser.add_argument(
        "--config", metavar="FILE",
        help="a TOML / JSON recipe (inject options) or a PEFT adapter_config.json; flags override its values",
    )  # fmt: skip
    add_recipe_arguments(parser)
    parser.add_argument(
        "--peft",
        metavar="DIR",
        help="apply a trained PEFT adapter (adapter_config.json + safetensors) instead",
    )
    parser.add_argument(
        "--merge", action="store_true", default=None, help="fold the branches into the weights"
    )
    parser.add_argument(
        "--validate", action="store_true", default=None,
        help="prove each model in onnxruntime before writing it (inject: unchanged outputs for B = 0, else "
        "equal to its fold; --merge: merged equals unmerged)",
    )  # fmt: skip
    add_run_arguments(parser)
    add_inputs_argument(parser)
    parser.add_argument(
        "--jobs", "-j", type=int, default=1, metavar="N",
        help="models converted in parallel, each in its own process (0: one per CPU; default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--shard", metavar="I/N",
        help="convert only part I of N (1-based): models sorted by relative path, the k-th to part k%%N+1",
    )  # fmt: skip
    parser.add_argument("--skip-existing", action="store_true", help="leave models whose output exists")
    parser.add_argument(
        "--skip-unmatched", action="store_true",
        help="with --peft: skip adapter keys no module of the model (of a folder: no model file) has, "
        "listing them in the report, instead of failing it",
    )  # fmt: skip
    add_data_arguments(parser)
    parser.add_argument("--report", metavar="FILE.json", help="write the per-model report as JSON")
    parser.add_argument("--junit", metavar="FILE.xml", help="write the per-model report as JUnit XML")
    # Flags left out must not hide the config file's values: unset flags are None, and only the flags
    # given on the command line override the file.
    parser.set_defaults(**{dest: None for dest in _FLAG_KEYS})
    parser.set_defaults(func=run)


def _given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe and run options given on the command line, as recipe option values."""
    from lora_onnx.proofs.inputs import parse_dims

    given: dict[str, Any] = {}
    for dest, key in _FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is None or value == []:
            continue
        if dest == "rank_pattern":
            value = _pairs(value, "--rank-pattern", int)
        elif dest == "alpha_pattern":
            value = _pairs(value, "--alpha-pattern", float)
        elif dest == "dim":
            value = parse_dims(value)
        given[key] = value
    return given


def options_from_args(args: argparse.Namespace) -> tuple[BatchOptions, tuple[str, ...]]:
    """Batch options from ``--config`` overridden by flags, and notes on how a PEFT config was read."""
    from lora_onnx.commands.batch import AdapterSource, BatchOptions
    from lora_onnx.recipes.files import RECIPE_KEYS, build_config, load_recipe

    recipe_file = load_recipe(args.config) if args.config else None
    options = {**(recipe_file.options if recipe_file else {}), **_given_flags(args)}
    notes = recipe_file.notes if recipe_file else ()
    if "peft" in options:
        recipe_keys = sorted(key for key in options if key in RECIPE_KEYS)
        if recipe_keys or (recipe_file and recipe_file.kind == "peft"):
            what = ", ".join(recipe_keys) or f"the recipe {args.config}"
            raise LoraOnnxError(
                f"--peft applies a trained adapter with its own ranks and targets; {what} cannot apply to it"
            )
        recipe: Any = AdapterSource(Path(options["peft"]))
    else:
        recipe = build_config(options)
    if args.skip_unmatched and "peft" not in options:
        raise LoraOnnxError("--skip-unmatched applies with --peft (keys of a trained adapter)")
    if options.get("dims") and not options.get("validate"):
        raise LoraOnnxError("--dim sets the symbolic dims of the --validate run's inputs; add --validate")
    inputs = getattr(args, INPUTS_DEST)
    if inputs is not None and not options.get("validate"):
        raise LoraOnnxError("--inputs feeds the --validate run; add --validate")
    if inputs is not None and options.get("dims"):
        raise LoraOnnxError("--dim shapes generated inputs; with --inputs FILE.npz the arrays' shapes apply")
    batch_options = BatchOptions(
        recipe=recipe,
        merge=bool(options.get("merge", False)),
        validate=bool(options.get("validate", False)),
        providers=options.get("providers", "cpu"),
        dims=options.get("dims", {}),
        skip_existing=args.skip_existing,
        skip_unmatched=args.skip_unmatched,
        allow_nonfinite=args.allow_nonfinite,
        link_data=args.link_data,
        inputs=inputs,
    )
    return batch_options, notes


def _line(report: ModelReport, done: int, total: int) -> str:
    label = {"ok": "ok", "mismatch": "MISMATCH", "failed": "FAILED", "skipped": "skipped"}[report.status]
    return f"[{done}/{total}] {label:<8} {report.path}: {report.message} ({report.seconds:.1f} s)"


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A CI runner cancels with SIGTERM (a closed terminal: SIGHUP): unwind like Ctrl-C so jobs stop and
    temporary files go."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    try:
        previous = {name: signal.signal(getattr(signal, name), interrupt) for name in names}
    except ValueError:  # not the main thread (e.g. called from a test runner's worker)
        yield
        return
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def run(args: argparse.Namespace) -> int:
    from lora_onnx.commands.batch import AdapterSource, plan_batch, run_batch
    from lora_onnx.commands.reports import parse_shard
    from lora_onnx.model.save import check_report_paths

    options, notes = options_from_args(args)
    for note in notes:
        warn(note)
    shard = parse_shard(args.shard) if args.shard else None
    plan = plan_batch(args.inputs, args.output_dir, shard, folders=isinstance(options.recipe, AdapterSource))
    sources = [job.source / model for job in plan.jobs for model in job.models]
    sources += [job.source for job in plan.jobs if not job.is_folder]
    outputs = [job.output / model for job in plan.jobs for model in job.models]
    outputs += [job.output for job in plan.jobs if not job.is_folder]
    reads = [*sources, *outputs, args.config, args.peft]
    check_report_paths([args.report, args.junit], reads, sources)
    total = plan.models
    part = f" (shard {shard} of {plan.total} models)" if shard else ""
    units = sum(job.is_folder for job in plan.jobs)
    grouped = f", {units} folder(s) converted as one unit each" if units else ""
    info(f"Converting {total} model(s) from {plan.root} into {plan.output_dir}{part}{grouped}")
    done = 0

    try:
        # A bar on a terminal (see render.StepReporter); each model's line is printed above it.
        with _sigterm_as_interrupt(), progress.step(f"converting {total} model(s)", total=total) as advance:
            shown: dict[str, str | None] = {}  # folder -> its error, once printed in full

            def log(report: ModelReport) -> None:
                nonlocal done
                done += 1
                if report.folder is not None and report.error and shown.get(report.folder) == report.error:
                    report = replace(report, error="failed with its folder (the error above)")
                elif report.folder is not None:
                    shown[report.folder] = report.error
                info(_line(report, done, total))
                for note in report.notes:  # shared weights a merge untied
                    info(f"    note: {note}")
                advance()

            report = run_batch(
                args.inputs, args.output_dir, options, jobs=args.jobs, plan=plan,
                on_start=lambda job: advance.describe(job.path), on_result=log,
            )  # fmt: skip
    except KeyboardInterrupt:
        render.error(
            f"interrupted after {done} of {total} model(s); finished outputs are complete, the others were "
            "not written"
        )
        return 130
    return finish(report, args.report, args.junit)


def finish(report: BatchReport, json_path: str | None, junit_path: str | None) -> int:
    """Write the reports asked for, print failures and the summary; the run's exit code."""
    from lora_onnx.commands.reports import write_junit, write_report

    if json_path:
        write_report(json_path, report)
    if junit_path:
        write_junit(junit_path, report)
    folder_errors = {folder.path: folder.error for folder in report.folders if folder.error}
    for model in report.models:
        if model.folder is not None and model.error and folder_errors.get(model.folder) == model.error:
            continue  # said once, for its folder
        if model.status in ("failed", "mismatch"):
            render.error(f"{model.path}: {model.message}")
    for folder in report.folders:
        if folder.status in ("failed", "mismatch"):
            name = folder.source if folder.path == "." else folder.path
            why = f"{folder.error}; " if folder.error else ""
            render.error(f"folder {name}: {why}none of its {len(folder.models)} file(s) was written")
    render.final(report.summary())
    return report.exit_code
