"""Prove a rewrite in onnxruntime: run two models on the same inputs and compare every output.

An output passes when ``max|candidate - reference| <= atol + rtol * max|reference|`` (a norm-wise
test, robust to outputs with elements near zero). NaN / Inf are never agreement: a candidate with one
where the reference is finite fails, and so does a reference with any, unless ``allow_nonfinite``
(``--allow-nonfinite``), which requires them at the same positions and compares the finite rest.
Defaults follow the output's type: float32/64 rtol 1e-4, atol 1e-5; float16/bfloat16 rtol 1e-2, atol
1e-3; integers and booleans must be equal. Tolerances (finite, >= 0) can be set per output, as
Polygraphy does.

Providers are always passed explicitly and checked after the session exists: onnxruntime silently
falls back to the CPU when CUDA is unusable, and a validation asked for CUDA must then fail, not pass.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lora_onnx.common import progress
from lora_onnx.common.finite import finite_number
from lora_onnx.errors import LoraOnnxError, ProviderError
from lora_onnx.model.load import LoadedModel, load_model
from lora_onnx.model.save import save_model, serialize_in_place
from lora_onnx.proofs.inputs import InputSpec, load_inputs, make_inputs

if TYPE_CHECKING:  # imported where a session is made: inspect and inject without --validate never need it
    import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: Environment variable capping onnxruntime's threads per session (intra-op). Unset, onnxruntime uses
#: every core; ``batch --jobs N`` sets it in each job so N parallel validations share the machine.
THREADS_ENV = "LORA_ONNX_THREADS"

Tolerances = float | Mapping[str, float] | None
#: Validation inputs the user gives: an .npz path or arrays by input name (None: generated).
InputsLike = str | os.PathLike | Mapping[str, np.ndarray] | None
#: onnxruntime log severity for our sessions (4 = FATAL): its errors reach the user in our own message.
ORT_QUIET = 4


@dataclass(frozen=True)
class OutputComparison:
    """One output on one provider: the largest absolute and relative error and the verdict."""

    provider: str
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    ok: bool
    note: str = ""
    #: NaN / Inf elements in each output (a finite reference needs a finite candidate; see compare).
    nonfinite_reference: int = 0
    nonfinite_candidate: int = 0


@dataclass(frozen=True)
class ValidationReport:
    comparisons: tuple[OutputComparison, ...]
    providers: tuple[str, ...]
    input_shapes: Mapping[str, tuple[int, ...]]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    @property
    def failures(self) -> tuple[OutputComparison, ...]:
        return tuple(c for c in self.comparisons if not c.ok)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "providers": list(self.providers),
            "inputs": {name: list(shape) for name, shape in self.input_shapes.items()},
            "outputs": [
                {**{k: _json_number(v) for k, v in asdict(c).items()}, "shape": list(c.shape)}
                for c in self.comparisons
            ],
        }


def _json_number(value: object) -> object:
    """JSON has no NaN / Infinity (``json.dumps`` writes them, and strict readers such as jq refuse the
    file): a non-finite error is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def parse_providers(providers: str | Sequence[str]) -> tuple[str, ...]:
    """``"cpu,cuda"`` or ``["cpu"]`` or full provider names -> full provider names."""
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    names = []
    for item in (i.strip() for i in items if i.strip()):
        name = PROVIDERS.get(item.lower(), item)
        if name not in PROVIDERS.values():
            raise LoraOnnxError(f"unknown provider {item!r}; use cpu or cuda")
        names.append(name)
    if not names:
        raise LoraOnnxError("no provider given; use cpu, cuda or cpu,cuda")
    return tuple(dict.fromkeys(names))


def session_threads() -> int | None:
    """Threads per session from :data:`THREADS_ENV`, or None for onnxruntime's default."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise LoraOnnxError(f"{THREADS_ENV} must be a positive whole number, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class InMemoryModel:
    """A serialized model for onnxruntime whose external data locations are relative to ``folder``."""

    data: bytes
    folder: Path | None


#: What a session loads: a model file, or a model in memory.
SessionSource = str | os.PathLike | InMemoryModel


def create_session(path: SessionSource, provider: str, label: str | None = None) -> ort.InferenceSession:
    """A session on exactly ``provider``; raises :class:`ProviderError` when it is not the one in use.

    ``label`` names the model in messages (the user's file, when ``path`` is a model in memory).
    """
    import onnxruntime as ort

    label = label or str(path)
    if provider not in ort.get_available_providers():
        extra = " (install onnxruntime-gpu, e.g. pip install 'lora-onnx[cuda]')" if "CUDA" in provider else ""
        raise ProviderError(
            f"{provider} was requested but this onnxruntime build only has "
            f"{', '.join(ort.get_available_providers())}{extra}"
        )
    options = ort.SessionOptions()
    # FATAL only: onnxruntime's own ERROR lines ("[E:onnxruntime:...]", in red) would precede our one-line
    # message, which carries its error text; the default logger covers model loading, the session's runs.
    options.log_severity_level = ORT_QUIET
    ort.set_default_logger_severity(ORT_QUIET)
    threads = session_threads()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    source: str | bytes = str(path)
    if isinstance(path, InMemoryModel):
        source = path.data
        if path.folder is not None:  # external data is read where it is: no link or copy of it
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(path.folder)
            )
    try:
        session = ort.InferenceSession(source, options, providers=chain)
    except Exception as exc:  # onnxruntime raises its own exception types for unloadable models
        message = (
            _first_line(exc)
            if isinstance(path, InMemoryModel)
            else _first_line(exc).replace(str(path), label)
        )
        raise LoraOnnxError(f"onnxruntime cannot load {label}: {message}") from exc
    if session.get_providers()[0] != provider:
        raise ProviderError(
            f"{provider} was requested but onnxruntime fell back to {session.get_providers()[0]} for {label} "
            "(is the GPU driver / CUDA runtime usable?)"
        )
    return session


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def input_specs(session: ort.InferenceSession) -> list[InputSpec]:
    return [InputSpec(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()]


def given_inputs(inputs: InputsLike, specs: Sequence[InputSpec]) -> dict[str, np.ndarray] | None:
    """The user's inputs as arrays (an .npz is read and checked against ``specs``), None when not given."""
    if inputs is None:
        return None
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return load_inputs(inputs, specs)


def default_tolerance(dtype: np.dtype) -> tuple[float, float]:
    if dtype in (np.float16,) or dtype.name == "bfloat16":
        return 1e-2, 1e-3
    if np.issubdtype(dtype, np.floating):
        return 1e-4, 1e-5
    return 0.0, 0.0


def _pick(tolerance: Tolerances, name: str, default: float) -> float:
    if tolerance is None:
        return default
    if isinstance(tolerance, Mapping):
        return float(tolerance.get(name, tolerance.get("*", default)))
    return float(tolerance)


def check_tolerances(rtol: Tolerances, atol: Tolerances) -> None:
    """Refuse a NaN, infinite or negative tolerance (an infinite rtol would pass any finite output)."""
    for flag, tolerance in (("rtol", rtol), ("atol", atol)):
        if tolerance is None:
            continue
        items = tolerance.items() if isinstance(tolerance, Mapping) else [("*", tolerance)]
        for name, value in items:
            finite_number(value, flag if name == "*" else f"{flag} for output {name!r}")


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    name: str,
    provider: str,
    rtol: Tolerances,
    atol: Tolerances,
    allow_nonfinite: bool = False,
) -> OutputComparison:
    """Compare one output (see the module doc for the rule).

    NaN / Inf are never agreement: a candidate with one where the reference is finite fails, and a
    reference that has any fails too (a model that outputs NaN proves nothing) unless
    ``allow_nonfinite``, which then requires them at the same positions (NaN where NaN, Inf of the same
    sign) and compares the finite rest with the tolerances.
    """
    default_r, default_a = default_tolerance(reference.dtype)
    r, a = _pick(rtol, name, default_r), _pick(atol, name, default_a)
    shape = tuple(reference.shape)
    if reference.shape != candidate.shape:
        note = f"shape {list(candidate.shape)} differs from the reference's {list(reference.shape)}"
        return OutputComparison(provider, name, shape, float("inf"), float("inf"), r, a, False, note)
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    ref_finite, cand_finite = np.isfinite(ref), np.isfinite(cand)
    counts = {
        "nonfinite_reference": int(ref.size - np.count_nonzero(ref_finite)),
        "nonfinite_candidate": int(cand.size - np.count_nonzero(cand_finite)),
    }

    def failed(note: str) -> OutputComparison:
        return OutputComparison(
            provider, name, shape, float("inf"), float("inf"), r, a, False, note, **counts
        )

    stray = int(np.count_nonzero(ref_finite & ~cand_finite))
    if stray:
        return failed(f"the candidate has {stray} NaN/Inf values where the reference is finite")
    if counts["nonfinite_reference"] and not allow_nonfinite:
        return failed(
            f"reference output {name!r} has {counts['nonfinite_reference']} NaN/Inf values; pass "
            "--allow-nonfinite to compare them position by position"
        )
    same_special = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))
    differ = int(np.count_nonzero(~ref_finite & ~same_special))
    if differ:
        return failed(f"{differ} NaN/Inf values of the reference are not matched by the candidate")
    finite = ref_finite  # the candidate is finite wherever the reference is (checked above)
    diff = np.abs(ref[finite] - cand[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = max_abs <= a + r * scale
    return OutputComparison(provider, name, shape, max_abs, max_rel, r, a, ok, **counts)


def session_source(model: LoadedModel, stack: ExitStack, name: str = "model.onnx") -> SessionSource:
    """What onnxruntime loads to run ``model`` (a rewritten model not saved yet).

    In memory, reading the base's external data where it is, whenever possible: nothing is written and
    the input's data files get no new link (onnx >= 1.21 refuses data files with several). A folded
    model's changed weights need a data file: then a scratch copy in a temporary folder, gone when
    ``stack`` closes (its unchanged data is linked there, which costs nothing where a copy would write
    the whole model again).
    """
    data = serialize_in_place(model)
    if data is not None:
        return InMemoryModel(data, model.base_dir if model.external_refs() else None)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lora-onnx-")))
    return save_model(model, folder / name, link_data=True)


def _as_path(
    model: str | os.PathLike | LoadedModel, stack: ExitStack
) -> tuple[SessionSource, str, LoadedModel]:
    """What onnxruntime loads, the name to show for it (never a temporary path), and the model (whose
    graph generated inputs read: embedding rows, attention heads)."""
    if not isinstance(model, LoadedModel):
        # our own checks first (one line naming the tensor and file, stricter than onnxruntime's)
        loaded = load_model(model, check_manifest=False)
        return Path(model), str(model), loaded
    label = str(model.path) if model.path is not None else model.name
    return session_source(model, stack), label, model


def run_model(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], label: str
) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feeds))
    except Exception as exc:  # onnxruntime's own exception types
        raise LoraOnnxError(f"onnxruntime failed to run {label}: {_first_line(exc)}") from exc
    return dict(zip(names, values, strict=True))


def validate(
    reference: str | os.PathLike | LoadedModel,
    candidate: str | os.PathLike | LoadedModel,
    *,
    providers: str | Sequence[str] = ("cpu",),
    rtol: Tolerances = None,
    atol: Tolerances = None,
    inputs: InputsLike = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    allow_nonfinite: bool = False,
) -> ValidationReport:
    """Run both models on the same inputs on every provider and compare every reference output.

    ``inputs`` is an .npz path or a mapping of arrays; otherwise inputs are generated (see
    :mod:`lora_onnx.proofs.inputs`). ``rtol`` / ``atol`` are one number or a mapping output name -> number
    (finite, >= 0). An output with NaN / Inf fails unless ``allow_nonfinite`` (see :func:`compare`).
    """
    check_tolerances(rtol, atol)
    chosen = parse_providers(providers)
    comparisons: list[OutputComparison] = []
    feeds: dict[str, np.ndarray] = {}
    with ExitStack() as stack:
        (ref_path, ref_label, ref_model), (cand_path, cand_label, _) = (
            _as_path(reference, stack),
            _as_path(candidate, stack),
        )
        # Two sessions and two runs per provider.
        advance = stack.enter_context(progress.step("validating in onnxruntime", total=4 * len(chosen)))
        for provider in chosen:
            ref_session = create_session(ref_path, provider, ref_label)
            advance()
            cand_session = create_session(cand_path, provider, cand_label)
            advance()
            if not feeds:
                specs = input_specs(ref_session)
                given = given_inputs(inputs, specs)
                if given is not None:
                    feeds = given
                else:
                    feeds = make_inputs(specs, dims, seed, strict=True, graph=ref_model.proto.graph)
            ref_out = run_model(ref_session, feeds, ref_label)
            advance()
            cand_out = run_model(cand_session, feeds, cand_label)
            advance()
            for name, value in ref_out.items():
                if name not in cand_out:
                    comparisons.append(
                        OutputComparison(
                            provider,
                            name,
                            tuple(value.shape),
                            float("inf"),
                            float("inf"),
                            0,
                            0,
                            False,
                            "missing from the candidate model",
                        )
                    )
                    continue
                comparisons.append(
                    compare(
                        value,
                        cand_out[name],
                        name=name,
                        provider=provider,
                        rtol=rtol,
                        atol=atol,
                        allow_nonfinite=allow_nonfinite,
                    )
                )
    shapes = {name: tuple(value.shape) for name, value in feeds.items()}
    return ValidationReport(tuple(comparisons), chosen, shapes)
