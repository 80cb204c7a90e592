"""Prove a rewrite in onnxruntime: run two models on the same inputs and compare every output.

An output passes when ``max|candidate - reference| <= atol + rtol * max|reference|`` (a norm-wise
test, robust to outputs with elements near zero). Defaults follow the output's type: float32/64
rtol 1e-4, atol 1e-5; float16/bfloat16 rtol 1e-2, atol 1e-3; integers and booleans must be equal.
Tolerances can be set per output, as Polygraphy does.

Providers are always passed explicitly and checked after the session exists: onnxruntime silently
falls back to the CPU when CUDA is unusable, and a validation asked for CUDA must then fail, not pass.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_onnx.errors import LoraOnnxError, ProviderError
from lora_onnx.inputs import InputSpec, load_inputs, make_inputs
from lora_onnx.load import LoadedModel
from lora_onnx.save import save_model

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: Environment variable capping onnxruntime's threads per session (intra-op). Unset, onnxruntime uses
#: every core; ``batch --jobs N`` sets it in each job so N parallel validations share the machine.
THREADS_ENV = "LORA_ONNX_THREADS"

Tolerances = float | Mapping[str, float] | None


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
            "outputs": [{**asdict(c), "shape": list(c.shape)} for c in self.comparisons],
        }


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


def create_session(path: str | os.PathLike, provider: str, label: str | None = None) -> ort.InferenceSession:
    """A session on exactly ``provider``; raises :class:`ProviderError` when it is not the one in use.

    ``label`` names the model in messages (the user's file, when ``path`` is a temporary copy).
    """
    label = label or str(path)
    if provider not in ort.get_available_providers():
        extra = " (install onnxruntime-gpu, e.g. pip install 'lora-onnx[cuda]')" if "CUDA" in provider else ""
        raise ProviderError(
            f"{provider} was requested but this onnxruntime build only has "
            f"{', '.join(ort.get_available_providers())}{extra}"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = session_threads()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=chain)
    except Exception as exc:  # onnxruntime raises its own exception types for unloadable models
        message = _first_line(exc).replace(str(path), label)
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


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    name: str,
    provider: str,
    rtol: Tolerances,
    atol: Tolerances,
) -> OutputComparison:
    """Compare one output (see the module doc for the rule)."""
    default_r, default_a = default_tolerance(reference.dtype)
    r, a = _pick(rtol, name, default_r), _pick(atol, name, default_a)
    shape = tuple(reference.shape)
    if reference.shape != candidate.shape:
        note = f"shape {list(candidate.shape)} differs from the reference's {list(reference.shape)}"
        return OutputComparison(provider, name, shape, float("inf"), float("inf"), r, a, False, note)
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    same_special = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))
    finite = np.isfinite(ref) & np.isfinite(cand)
    if not np.all(same_special | finite):
        count = int(np.sum(~(same_special | finite)))
        return OutputComparison(
            provider,
            name,
            shape,
            float("inf"),
            float("inf"),
            r,
            a,
            False,
            f"{count} elements are NaN/inf in one only",
        )
    diff = np.abs(ref[finite] - cand[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputComparison(provider, name, shape, max_abs, max_rel, r, a, max_abs <= a + r * scale)


def _as_path(model: str | os.PathLike | LoadedModel, stack: ExitStack) -> tuple[Path, str]:
    """A file onnxruntime can load, and the name to show for it (never a temporary path)."""
    if not isinstance(model, LoadedModel):
        return Path(model), str(model)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lora-onnx-")))
    label = str(model.path) if model.path is not None else model.name
    # A scratch copy for onnxruntime, gone when the run ends: linking the base's data (when no clone is
    # possible) costs nothing, where a copy would write the whole model again into the temp folder.
    return save_model(model, folder / "model.onnx", link_data=True), label


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
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Run both models on the same inputs on every provider and compare every reference output.

    ``inputs`` is an .npz path or a mapping of arrays; otherwise inputs are generated (see
    :mod:`lora_onnx.inputs`). ``rtol`` / ``atol`` are one number or a mapping output name -> number.
    """
    chosen = parse_providers(providers)
    comparisons: list[OutputComparison] = []
    feeds: dict[str, np.ndarray] = {}
    with ExitStack() as stack:
        (ref_path, ref_label), (cand_path, cand_label) = (
            _as_path(reference, stack),
            _as_path(candidate, stack),
        )
        for provider in chosen:
            ref_session = create_session(ref_path, provider, ref_label)
            cand_session = create_session(cand_path, provider, cand_label)
            if not feeds:
                specs = input_specs(ref_session)
                if isinstance(inputs, Mapping):
                    feeds = dict(inputs)
                elif inputs is not None:
                    feeds = load_inputs(inputs, specs)
                else:
                    feeds = make_inputs(specs, dims, seed)
            ref_out = run_model(ref_session, feeds, ref_label)
            cand_out = run_model(cand_session, feeds, cand_label)
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
                    compare(value, cand_out[name], name=name, provider=provider, rtol=rtol, atol=atol)
                )
    shapes = {name: tuple(value.shape) for name, value in feeds.items()}
    return ValidationReport(tuple(comparisons), chosen, shapes)
