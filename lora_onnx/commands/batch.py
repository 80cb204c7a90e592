"""``batch``: one recipe over many models, each proven on its own, none stopping the others.

- **Inputs** are files, folders (every ``*.onnx`` below them) and glob patterns. Outputs mirror the inputs'
  layout under the output folder, relative to the inputs' common root: the folder itself for a folder,
  the parent for a file, the part before the first wildcard for a glob. Each output brings its external
  data (see :mod:`lora_onnx.model.save`). The output folder must not hold any input; when it lies inside an
  input folder its contents are left out of that folder's models (earlier outputs are not re-converted).
- **Per model**: load, apply the recipe (a fresh adapter from a :class:`LoraConfig`, or a trained
  adapter from an :class:`AdapterSource`), optionally fold it (``merge``), optionally prove it in
  onnxruntime (``validate``), then write atomically. Every error becomes that model's record
  (:class:`~lora_onnx.commands.reports.ModelReport`); nothing is written for a model that fails or mismatches.
- **Folders as units** (a trained adapter, ``AdapterSource``): a folder given as an INPUT is one export,
  maybe split into several files (Optimum's encoder / decoder files, a genai folder, a diffusers pipeline
  with ``unet/`` and ``text_encoder/``), so the adapter is routed across its files as ``inject FOLDER
  --peft`` routes it (:func:`~lora_onnx.commands.folders.apply_peft_folder`): each file takes the modules
  it carries, a module no file carries fails the folder, the side files are copied, and nothing of the
  folder is written unless all of it converts (and validates). Its files keep one record each (their
  ``folder`` says which unit), plus one :class:`~lora_onnx.commands.reports.FolderReport`. Files and
  globs, and every input of a fresh recipe, stay independent models.
- **Sharding** (``Shard(i, n)``): models sorted by relative path (POSIX form, byte order); the k-th
  (counting from 0) belongs to shard ``k % n + 1``. Every machine that sees the same inputs computes the
  same split, shard sizes differ by at most one, and the shards' reports merge into the whole run's.
- **Parallel jobs** (``jobs > 1``): a pool of ``jobs`` worker processes, forked from a fork server that
  has the libraries loaded already, each converting one model at a time for the whole run. A worker
  that dies (a native crash, the OOM killer) fails only the model it was converting and is replaced.
  Each worker's onnxruntime sessions get ``cpus // jobs`` threads (:data:`THREADS_ENV`).
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from lora_onnx import __version__
from lora_onnx.adapters.folders import find_models
from lora_onnx.adapters.formats.detect import is_lora_file, read_lora_file
from lora_onnx.adapters.peft.config import read_adapter_config
from lora_onnx.adapters.peft.planning import adapter_folder
from lora_onnx.commands.apply_peft import PeftResult, apply_peft
from lora_onnx.commands.folders import FolderFile, apply_peft_folder
from lora_onnx.commands.inject import inject
from lora_onnx.commands.merge import merge
from lora_onnx.commands.reports import (
    BatchReport,
    FolderReport,
    ModelReport,
    Shard,
    SkippedNode,
    now_iso,
    sort_models,
)
from lora_onnx.errors import LoraOnnxError, OutputError, ProviderError
from lora_onnx.model.load import LoadedModel, load_model
from lora_onnx.model.manifest import read_branches
from lora_onnx.model.save import save_model
from lora_onnx.proofs.validation import THREADS_ENV, ValidationReport, parse_providers
from lora_onnx.recipes.config import LoraConfig
from lora_onnx.recipes.files import PeftTargetSelector, recipe_digest

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class AdapterSource:
    """A trained adapter to apply to every model (a PEFT folder: adapter_config.json + safetensors)."""

    path: Path


Recipe = LoraConfig | AdapterSource


#: batch has no partial fold: what to do about a branch ``--merge`` cannot fold.
BATCH_MERGE_REMEDY = (
    "batch --merge folds every branch or fails the model: leave out --merge, or merge this model alone "
    "with lora-onnx merge --partial"
)


@dataclass(frozen=True)
class BatchOptions:
    """What to do to each model: the recipe, then fold (``merge``) and prove (``validate``) it."""

    recipe: Recipe = field(default_factory=LoraConfig)
    merge: bool = False
    validate: bool = False
    providers: tuple[str, ...] = ("cpu",)
    dims: Mapping[str, int] = field(default_factory=dict)
    skip_existing: bool = False
    #: A trained adapter's keys no module has (of a folder unit: no model file) are skipped and listed.
    skip_unmatched: bool = False
    #: Let proofs compare NaN / Inf outputs position by position (see lora_onnx.proofs.validation.compare).
    allow_nonfinite: bool = False
    #: hard-link unchanged data into the output folder instead of cloning / copying it (see save_model)
    link_data: bool = False
    #: An .npz of the validations' inputs (``--inputs``), for every model, instead of generated ones.
    inputs: str | None = None

    def __post_init__(self) -> None:
        providers = self.providers
        items = providers.split(",") if isinstance(providers, str) else providers
        object.__setattr__(self, "providers", tuple(item.strip() for item in items if item.strip()))
        object.__setattr__(self, "dims", dict(self.dims))


@dataclass(frozen=True)
class ModelJob:
    """One model: its file, its path relative to the inputs' root (the report key), its output.

    A folder converted as one unit has the folder as ``source`` and ``output`` and its model files in
    ``models`` (relative to the folder, POSIX separators); ``path`` is the folder's (``"."`` for the root).
    """

    source: Path
    path: str
    output: Path
    models: tuple[str, ...] = ()

    @property
    def is_folder(self) -> bool:
        return bool(self.models)

    def model_path(self, model: str) -> str:
        """The report key of one of a folder unit's model files."""
        return model if self.path == "." else f"{self.path}/{model}"

    @property
    def model_count(self) -> int:
        return len(self.models) or 1


@dataclass(frozen=True)
class BatchPlan:
    """The models of a run (this shard's part), their common root and how many the whole run has."""

    root: Path
    output_dir: Path
    jobs: tuple[ModelJob, ...]
    #: model files of the whole run (every shard), a folder unit counting each of its files
    total: int
    shard: Shard | None = None

    @property
    def models(self) -> int:
        """Model files of this shard's jobs."""
        return sum(job.model_count for job in self.jobs)


def _has_magic(text: str) -> bool:
    return any(char in text for char in _GLOB_CHARS)


def _glob_anchor(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: ``models/*/x.onnx`` -> ``models``."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _models_under(folder: Path, skip: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        # never descend into the output folder: its models are earlier outputs, not inputs
        dirnames[:] = sorted(d for d in dirnames if not _inside((here / d).resolve(), skip))
        found.extend(here / name for name in sorted(filenames) if name.endswith(".onnx"))
    return found


def collect_models(
    inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike
) -> tuple[Path, list[Path]]:
    """The inputs' common root and every model file they name, in input order, without duplicates.

    Raises :class:`LoraOnnxError` for a folder or glob that names no model, and :class:`OutputError`
    when the output folder holds an input (outputs would overwrite or mix with inputs). A file that does
    not exist is kept: it fails on its own, as its model's record.
    """
    root, files, _ = collect_inputs(inputs, output_dir)
    return root, files


def collect_inputs(
    inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *, folders: bool = False
) -> tuple[Path, list[Path], list[Path]]:
    """:func:`collect_models`, and with ``folders`` the folder inputs as units: (root, the model files
    outside them, the folders). A folder unit inside another, or one holding the output folder, is
    refused (:class:`OutputError`); a file inside a folder unit is converted with it."""
    if not inputs:
        raise LoraOnnxError("no input given; pass .onnx files, folders or glob patterns")
    out = Path(output_dir).resolve()
    anchors: list[Path] = []
    files: list[Path] = []
    units: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if _has_magic(text) and not path.exists():
            matches = sorted(glob.glob(text, recursive=True))
            found: list[Path] = []
            for match in map(Path, matches):
                if match.is_dir():
                    found.extend(_models_under(match, out))
                elif not _inside(match.resolve(), out):
                    found.append(match)
            if not found:
                raise LoraOnnxError(f"{text}: the pattern matches no .onnx model")
            anchors.append(_glob_anchor(text))
            files.extend(found)
        elif path.is_dir():
            if out == path.resolve():
                raise OutputError(
                    f"the output folder {output_dir} is the input folder {text}; outputs would overwrite "
                    "the inputs; choose another folder"
                )
            if _inside(path.resolve(), out):
                raise OutputError(
                    f"the input folder {text} is inside the output folder {output_dir}; choose an output "
                    "folder outside the inputs"
                )
            found = _models_under(path, out)
            if not found:
                raise LoraOnnxError(f"{text}: no .onnx model in this folder")
            anchors.append(path)
            if folders:
                if _inside(out, path.resolve()):
                    raise OutputError(
                        f"the output folder {output_dir} is inside the input folder {text}, which --peft "
                        "converts as one unit (all its files, side files included); choose an output folder "
                        "outside it"
                    )
                units.append(Path(os.path.abspath(path)))
            else:
                files.extend(found)
        else:
            if _inside(path.resolve(), out):
                raise OutputError(
                    f"the input {text} is inside the output folder {output_dir}; outputs would overwrite or "
                    "mix with inputs; choose an output folder outside the inputs"
                )
            anchors.append(path.parent)
            files.append(path)
    root = Path(os.path.commonpath([os.path.abspath(anchor) for anchor in anchors]))
    folders_found: dict[Path, Path] = {}
    for unit in units:
        folders_found.setdefault(unit.resolve(), unit)
    for one in folders_found:
        for other in folders_found:
            if one != other and _inside(one, other):
                raise OutputError(
                    f"the input folder {folders_found[one]} is inside the input folder "
                    f"{folders_found[other]}; with --peft a folder is one unit: give one of them"
                )
    unique: dict[Path, Path] = {}
    for file in files:
        resolved = file.resolve()
        if not any(_inside(resolved, unit) for unit in folders_found):  # converted with its folder
            unique.setdefault(resolved, Path(os.path.abspath(file)))
    return root, list(unique.values()), list(folders_found.values())


def shard_jobs(jobs: Sequence[ModelJob], shard: Shard | None) -> tuple[ModelJob, ...]:
    """This shard's jobs: sorted by relative path, the k-th goes to shard ``k % count + 1``."""
    ordered = sorted(jobs, key=lambda job: job.path.encode())
    if shard is None:
        return tuple(ordered)
    return tuple(job for k, job in enumerate(ordered) if k % shard.count + 1 == shard.index)


def plan_batch(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    shard: Shard | None = None,
    *,
    folders: bool = False,
) -> BatchPlan:
    """Every model of ``inputs`` with its output path under ``output_dir``, then this shard's part.
    ``folders`` (a trained adapter): each folder input is one job, its model files converted as a unit."""
    root, files, units = collect_inputs(inputs, output_dir, folders=folders)
    out = Path(output_dir)
    jobs = []
    for file in files:
        relative = file.relative_to(root)
        jobs.append(ModelJob(source=file, path=relative.as_posix(), output=out / relative))
    for unit in units:
        relative = unit.relative_to(root)
        found = find_models(unit)
        jobs.append(ModelJob(unit, relative.as_posix(), out / relative, found.models))
    total = sum(job.model_count for job in jobs)
    return BatchPlan(root, out, shard_jobs(jobs, shard), total, shard)


@dataclass(frozen=True)
class Applied:
    """A recipe applied to one model, before folding and writing."""

    model: LoadedModel
    sites: int
    lora_params: int
    skipped: tuple[SkippedNode, ...]
    warnings: tuple[str, ...]
    validation: ValidationReport | None


def apply_config(source: LoadedModel, config: LoraConfig, options: BatchOptions) -> Applied:
    """A fresh adapter; proven here unless a fold follows (the fold's validation proves both)."""
    result = inject(
        source,
        config,
        validate=options.validate and not options.merge,
        providers=options.providers,
        dims=options.dims,
        allow_nonfinite=options.allow_nonfinite,
        inputs=options.inputs,
    )
    skipped = tuple(
        SkippedNode(s.node, s.op, s.module_path, s.reason)
        for s in (*result.scan.skipped, *result.plan.skipped)
    )
    return Applied(
        result.model,
        len(result.branches),
        result.plan.lora_params,
        skipped,
        result.warnings,
        result.validation,
    )


def apply_adapter(source: LoadedModel, adapter: AdapterSource, options: BatchOptions) -> Applied:
    """A trained PEFT adapter (``inject --peft``); proven here unless a fold follows, as for recipes."""
    result = apply_peft(
        source,
        adapter.path,
        validate=options.validate and not options.merge,
        providers=options.providers,
        dims=options.dims,
        allow_nonfinite=options.allow_nonfinite,
        inputs=options.inputs,
        skip_unmatched=options.skip_unmatched,
    )
    return Applied(
        result.model,
        len(result.branches),
        result.plan.lora_params,
        tuple(SkippedNode(s.node, s.op, s.module_path, s.reason) for s in result.plan.skipped),
        result.warnings,
        result.validation,
    )


def apply_recipe(source: LoadedModel, options: BatchOptions) -> Applied:
    """The per-model step that takes either kind of recipe."""
    if isinstance(options.recipe, AdapterSource):
        return apply_adapter(source, options.recipe, options)
    return apply_config(source, options.recipe, options)


def _existing_sites(output: Path) -> int | None:
    """Branch count of a complete earlier output, None when there is none (or it does not load)."""
    if not output.is_file():
        return None
    try:
        return len(read_branches(load_model(output).ir_model))
    except LoraOnnxError:
        return None


def convert_model(job: ModelJob, options: BatchOptions) -> ModelReport:
    """Convert one model; every error, expected or not, becomes the returned record."""
    start = time.perf_counter()
    base = {"path": job.path, "source": str(job.source), "output": str(job.output)}
    try:
        if options.skip_existing:
            existing = _existing_sites(job.output)
            if existing is not None:
                seconds = time.perf_counter() - start
                return ModelReport(**base, status="skipped", sites=existing, seconds=seconds)
        source = load_model(job.source)
        applied = apply_recipe(source, options)
        model, validation = applied.model, applied.validation
        notes: tuple[str, ...] = ()
        if (validation is None or validation.ok) and options.merge:
            merged = merge(
                model, validate=options.validate, providers=options.providers, dims=options.dims,
                remedy=BATCH_MERGE_REMEDY,
                allow_nonfinite=options.allow_nonfinite, inputs=options.inputs,
            )  # fmt: skip
            model, validation, notes = merged.model, merged.validation, merged.notes  # notes: untied weights
        status = "ok"
        if validation is not None and not validation.ok:
            status = "mismatch"
        else:
            protect = [options.recipe.path] if isinstance(options.recipe, AdapterSource) else []
            save_model(model, job.output, protect=protect, link_data=options.link_data)
        return ModelReport(
            **base,
            status=status,
            seconds=time.perf_counter() - start,
            sites=applied.sites,
            lora_params=applied.lora_params,
            skipped=applied.skipped,
            warnings=applied.warnings,
            validation=validation.to_json() if validation is not None else None,
            notes=notes,
        )
    except LoraOnnxError as exc:
        return ModelReport(**base, status="failed", error=str(exc), seconds=time.perf_counter() - start)
    except Exception as exc:  # a bug, not the user's mistake: record it and go on with the other models
        return ModelReport(
            **base,
            status="failed",
            error=_internal(exc),
            traceback=traceback.format_exc(),
            seconds=time.perf_counter() - start,
        )


def _internal(exc: Exception) -> str:
    return f"internal error ({type(exc).__name__}: {exc}); please report it with the traceback"


@dataclass(frozen=True)
class JobResult:
    """What one job made: one record per model file, and a folder unit's own record."""

    models: tuple[ModelReport, ...]
    folder: FolderReport | None = None


def _file_record(
    job: ModelJob, file: FolderFile, status: str, seconds: float, error: str | None
) -> ModelReport:
    """The record of one model file of a folder unit that ran to its proofs."""
    result = file.result if isinstance(file.result, PeftResult) else None
    plan = result.plan if result is not None else None
    skipped = plan.skipped if plan is not None else ()
    return ModelReport(
        path=job.model_path(file.model),
        source=str(job.source / file.model),
        output=str(job.output / file.model),
        status=status,
        seconds=seconds,
        sites=file.branches,
        lora_params=plan.lora_params if plan is not None else 0,
        skipped=tuple(SkippedNode(s.node, s.op, s.module_path, s.reason) for s in skipped),
        warnings=result.warnings if result is not None else (),
        validation=result.validation.to_json() if result is not None and result.validation else None,
        error=error,
        notes=result.fold_notes if result is not None else (),
        folder=job.path,
        modules=file.modules,
    )


def _folder_failed(job: ModelJob, error: str, seconds: float, trace: str | None = None) -> JobResult:
    """Every model file of a folder unit failed with the folder's ``error`` (nothing was written)."""
    models = _unit_models(job, "failed", seconds, error=error, traceback=trace)
    folder = FolderReport(
        job.path, str(job.source), str(job.output), "failed", tuple(m.path for m in models), error=error,
        seconds=seconds,
    )  # fmt: skip
    return JobResult(models, folder)


def _unit_models(
    job: ModelJob, status: str, seconds: float, sites: Sequence[int] = (), **fields: Any
) -> tuple[ModelReport, ...]:
    """One record per model file of a folder unit, all with the unit's ``status`` and an equal share of
    its ``seconds`` (``sites``: per file, in order; ``fields``: the same for every file)."""
    share = seconds / job.model_count
    counts = list(sites) or [0] * job.model_count
    return tuple(
        ModelReport(
            job.model_path(model),
            str(job.source / model),
            str(job.output / model),
            status,
            seconds=share,
            sites=count,
            folder=job.path,
            **fields,
        )
        for model, count in zip(job.models, counts, strict=True)
    )


def convert_folder(job: ModelJob, options: BatchOptions) -> JobResult:
    """Convert a folder unit (``inject FOLDER --peft``, see the module doc); every error, expected or
    not, fails each of its files."""
    start = time.perf_counter()
    assert isinstance(options.recipe, AdapterSource), "folder units take a trained adapter"
    try:
        if options.skip_existing:
            existing = [_existing_sites(job.output / model) for model in job.models]
            if all(sites is not None for sites in existing):
                counts = [sites or 0 for sites in existing]
                models = _unit_models(job, "skipped", time.perf_counter() - start, counts)
                folder = FolderReport(
                    job.path, str(job.source), str(job.output), "skipped", tuple(m.path for m in models),
                    seconds=time.perf_counter() - start,
                )  # fmt: skip
                return JobResult(models, folder)
        result = apply_peft_folder(
            job.source, options.recipe.path, job.output, merge=options.merge, validate=options.validate,
            providers=options.providers, dims=options.dims, allow_nonfinite=options.allow_nonfinite,
            link_data=options.link_data, inputs=options.inputs, skip_unmatched=options.skip_unmatched,
        )  # fmt: skip
    except LoraOnnxError as exc:
        return _folder_failed(job, str(exc), time.perf_counter() - start)
    except Exception as exc:  # a bug: recorded, the other jobs go on
        return _folder_failed(job, _internal(exc), time.perf_counter() - start, traceback.format_exc())
    seconds = time.perf_counter() - start
    status = "ok" if result.ok else "mismatch"
    disagreed = [file.model for file in result.files if not file.ok]
    why = f"not written: {', '.join(disagreed)} of the folder disagreed in its proof" if disagreed else None
    share = seconds / len(result.files)
    models = tuple(_file_record(job, file, status, share, why if file.ok else None) for file in result.files)
    # The files' own warnings are in their records; the folder keeps the rest.
    own = tuple(f"{file.model}: " for file in result.files)
    warnings = tuple(w for w in result.warnings if not w.startswith(own))
    folder = FolderReport(
        job.path, str(job.source), str(job.output), status, tuple(m.path for m in models),
        tuple(str(path) for path in result.copied), warnings, seconds=seconds,
        skipped_keys=result.skipped_keys,
    )  # fmt: skip
    return JobResult(models, folder)


def convert_job(job: ModelJob, options: BatchOptions) -> JobResult:
    """Convert one job: a model file, or a folder unit."""
    if job.is_folder:
        return convert_folder(job, options)
    return JobResult((convert_model(job, options),))


# --- parallel jobs --------------------------------------------------------------------------------


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _worker_main(
    options: BatchOptions, threads: int, connection: multiprocessing.connection.Connection
) -> None:
    """A worker: convert the models the parent sends, one at a time, until it sends None."""
    # SIGTERM / SIGHUP (the batch stopped) unwind like Ctrl-C, so save_model removes its temporary files.
    signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGHUP"):  # a closed terminal hangs up the whole process group
        signal.signal(signal.SIGHUP, _interrupt)
    os.environ.setdefault(THREADS_ENV, str(threads))
    try:
        while (job := connection.recv()) is not None:
            connection.send(convert_job(job, options))
    except (KeyboardInterrupt, EOFError):
        return


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # The fork server imports onnx, onnxruntime and numpy once; each job forks from it ready to run.
        context.set_forkserver_preload(["lora_onnx.commands.batch"])
        return context
    return multiprocessing.get_context("spawn")


def _died(job: ModelJob, exitcode: int | None, seconds: float) -> JobResult:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        why = f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        why = f"exited with code {exitcode} without a result"
    error = f"the worker process converting it {why}; nothing was written"
    if job.is_folder:
        return _folder_failed(job, error, seconds)
    model = ModelReport(job.path, str(job.source), str(job.output), "failed", seconds, error=error)
    return JobResult((model,))


@dataclass
class _Worker:
    """A worker process, its end of the pipe, and the model it is converting (None when idle)."""

    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    job: ModelJob | None = None
    started: float = 0.0


def _run_parallel(
    jobs: Sequence[ModelJob],
    options: BatchOptions,
    workers: int,
    on_start: Callable[[ModelJob], None],
    on_result: Callable[[ModelReport], None],
) -> list[JobResult]:
    """Convert ``jobs`` on a pool of ``workers`` processes.

    Workers live for the whole run, so each model costs no process start-up; a worker that dies (a
    native crash, the OOM killer) fails only the model it was converting and is replaced.
    """
    context = _context()
    threads = max(1, available_cpus() // workers)
    pending = deque(jobs)
    pool: list[_Worker] = []
    results: list[JobResult] = []
    spawned = 0

    def spawn() -> _Worker:
        nonlocal spawned
        spawned += 1
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=_worker_main,
            args=(options, threads, child_end),
            name=f"lora-onnx worker {spawned}",
            daemon=True,
        )
        process.start()
        child_end.close()  # the worker holds the only other end: it reads as closed when the worker dies
        return _Worker(process, parent_end)

    def dispatch(worker: _Worker) -> None:
        job = pending.popleft()
        worker.job, worker.started = job, time.perf_counter()
        worker.connection.send(job)
        on_start(job)

    try:
        for _ in range(min(workers, len(pending))):
            pool.append(spawn())
        for worker in pool:
            dispatch(worker)
        while any(worker.job is not None for worker in pool):
            busy = {worker.connection: worker for worker in pool if worker.job is not None}
            for connection in multiprocessing.connection.wait(list(busy)):
                worker = busy[connection]  # type: ignore[index]
                assert worker.job is not None
                try:
                    report = worker.connection.recv()
                except (EOFError, OSError):
                    worker.process.join()
                    report = _died(worker.job, worker.process.exitcode, time.perf_counter() - worker.started)
                    worker.connection.close()
                    pool[pool.index(worker)] = worker = spawn()
                else:
                    worker.job = None
                results.append(report)
                for model in report.models:
                    on_result(model)
                if pending:
                    dispatch(worker)
                else:
                    worker.job = None
    finally:
        for worker in pool:
            if worker.job is None and worker.process.is_alive():
                with contextlib.suppress(OSError):
                    worker.connection.send(None)
            else:
                worker.process.terminate()
        for worker in pool:
            worker.process.join()
            worker.connection.close()
    return results


# --- the run ----------------------------------------------------------------------------------------


def options_record(options: BatchOptions) -> dict[str, Any]:
    """The run's options as JSON values, for the report (and its digest)."""
    recipe = options.recipe
    record: dict[str, Any]
    if isinstance(recipe, AdapterSource):
        record = {"peft": str(recipe.path)}
    else:
        targets = recipe.targets
        record = {
            "rank": recipe.rank,
            "alpha": recipe.alpha,
            "rslora": recipe.use_rslora,
            "target": list(targets.names),
            "target_regex": targets.regex,
            "exclude": list(targets.exclude),
            "exclude_regex": targets.exclude_regex,
            "rank_pattern": dict(recipe.rank_pattern),
            "alpha_pattern": dict(recipe.alpha_pattern),
            "ops": sorted(recipe.ops),
            "init": recipe.init,
            "seed": recipe.seed,
            "name": recipe.adapter_name,
        }
        if isinstance(targets, PeftTargetSelector):
            record["layers_to_transform"] = list(targets.layers)
            record["layers_pattern"] = list(targets.layers_pattern)
            record["modules_to_save"] = list(targets.protected)
    record.update(
        merge=options.merge,
        validate=options.validate,
        providers=list(options.providers),
        dims=dict(options.dims),
    )
    if options.allow_nonfinite:  # only when set, so earlier reports keep their recipe digest
        record["allow_nonfinite"] = True
    if options.inputs is not None:  # likewise
        record["inputs"] = options.inputs
    if options.skip_unmatched:  # likewise
        record["skip_unmatched"] = True
    return record


def check_options(options: BatchOptions) -> None:
    """Problems that would fail every model, raised once before any model runs."""
    providers = parse_providers(options.providers)
    if options.validate:
        available = ort.get_available_providers()
        for provider in providers:
            if provider not in available:
                raise ProviderError(
                    f"{provider} was requested but this onnxruntime build only has {', '.join(available)}"
                )
    if isinstance(options.recipe, AdapterSource):
        # A bad adapter folder is everyone's problem: say so once, not once per model.
        if is_lora_file(options.recipe.path):
            read_lora_file(options.recipe.path)  # a single-file LoRA (its component fits per model)
        else:
            read_adapter_config(adapter_folder(options.recipe.path))


def run_batch(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    options: BatchOptions | None = None,
    *,
    jobs: int = 1,
    shard: Shard | None = None,
    on_start: Callable[[ModelJob], None] | None = None,
    on_result: Callable[[ModelReport], None] | None = None,
    plan: BatchPlan | None = None,
) -> BatchReport:
    """Convert every model of ``inputs`` (this ``shard``'s part) into ``output_dir``; see the module doc.

    ``jobs``: models converted at once (1 runs in this process; 0 means one per CPU). ``on_start`` /
    ``on_result`` are called as models start and finish (progress display). Raises
    :class:`LoraOnnxError` only for problems of the whole run (no input, a bad output folder, an
    unusable provider); a model's problems end up in its record.
    """
    options = options or BatchOptions()
    check_options(options)
    plan = plan or plan_batch(inputs, output_dir, shard, folders=isinstance(options.recipe, AdapterSource))
    if jobs < 0:
        raise LoraOnnxError(f"--jobs must be 0 (one per CPU) or more, got {jobs}")
    workers = min(jobs or available_cpus(), max(1, len(plan.jobs)))
    started_at = time.perf_counter()
    on_start = on_start or (lambda job: None)
    on_result = on_result or (lambda report: None)
    if workers <= 1:
        results = []
        for job in plan.jobs:
            on_start(job)
            result = convert_job(job, options)
            results.append(result)
            for model in result.models:
                on_result(model)
    else:
        results = _run_parallel(plan.jobs, options, workers, on_start, on_result)
    record = options_record(options)
    folders = sorted((r.folder for r in results if r.folder is not None), key=lambda f: f.path)
    return BatchReport(
        models=sort_models(m for r in results for m in r.models),
        folders=tuple(folders),
        recipe=record,
        recipe_digest=recipe_digest(record),
        total=plan.total,
        shard_count=plan.shard.count if plan.shard else 0,
        shards=(plan.shard.index,) if plan.shard else (),
        seconds=time.perf_counter() - started_at,
        created=now_iso(),
        tool=f"lora-onnx {__version__}",
        output_dir=str(plan.output_dir),
    )
