"""``inject FOLDER --mixed --peft A --peft B ... -o OUT_DIR``: mixed-batch branches across a folder's model
files, one index input meaning the same adapter in every file.

Each adapter's modules are routed to the model files as ``inject FOLDER --peft`` routes one adapter's
(:mod:`lora_onnx.adapters.folders`; every module must land in at least one file, else the usual error,
unless ``skip_unmatched``). Every model file that takes a module of any adapter then gets the stacked
branches of :func:`~lora_onnx.commands.inject_mixed.inject_mixed` for the modules it carries, with every
adapter at its position (an adapter without a module in a file keeps its index there, its rows run that
file's base), so ``lora_adapter_index`` selects the same adapter in the encoder and the decoders. Files
that take none are written unchanged, with a note. Everything is planned and proven (``validate``: per
file, a mixed batch against each row alone) before the first file is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lora_onnx.adapters.folders import (
    ModelFolder,
    Routing,
    check_output_folder,
    copy_side_files,
    find_models,
    model_label,
    route_modules,
    without_data_files,
)
from lora_onnx.adapters.formats.detect import is_lora_file
from lora_onnx.adapters.peft.mapping import AdapterModule
from lora_onnx.adapters.peft.planning import PEFT_OPS
from lora_onnx.commands.folders import (
    FolderFile,
    FolderResult,
    FolderSource,
    _adapter_modules,
    _check_writes,
    _load,
    _part,
    _route_lora_file,
)
from lora_onnx.commands.inject_mixed import MixedInjectResult, host_model, inject_mixed
from lora_onnx.commands.swap import AdapterSource, peft_source
from lora_onnx.errors import AdapterError, LoraOnnxError
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.save import save_model
from lora_onnx.sites.find import scan_sites

PURPOSE = "mixed-batch branches"


def _routes(
    found: ModelFolder,
    hosts: Mapping[str, LoadedModel],
    adapter: str | os.PathLike,
    skip_unmatched: bool,
) -> tuple[Routing, dict[str, str] | None]:
    """One adapter's modules per model file (a single-file LoRA's: each file's component part too)."""
    if is_lora_file(adapter):
        return _route_lora_file(found, adapter, skip_unmatched)
    modules, source = _adapter_modules(adapter)
    scans = {name: scan_sites(host, PEFT_OPS) for name, host in hosts.items()}
    return route_modules(found, modules, scans, source=source, skip_unmatched=skip_unmatched), None


def inject_mixed_folder(
    folder: FolderSource,
    adapters: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    stacks_as_inputs: bool = False,
    validate: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    allow_nonfinite: bool = False,
    skip_unmatched: bool = False,
    link_data: bool = False,
) -> FolderResult:
    """Mixed-batch branches holding the PEFT adapters ``adapters`` (folders or LoRA files, ``PeftRef``
    for a strength; stack index = position) on every model file of ``folder`` that carries their
    modules, written with the side files to the folder ``output`` (see the module doc). Options as for
    :func:`~lora_onnx.commands.inject_mixed.inject_mixed`; ``skip_unmatched``: keys of modules no model
    file has are skipped and listed instead of refused."""
    if not adapters:
        raise AdapterError("a mixed batch needs at least one adapter (--peft ADAPTER, once per adapter)")
    for adapter in adapters:
        if not Path(adapter).is_dir() and not is_lora_file(adapter):
            raise AdapterError(
                f"{adapter}: a folder run of --mixed takes PEFT adapters (a folder or a LoRA .safetensors "
                "file); adapter files name one model's slots: build that model's mixed model alone"
            )
    found = find_models(folder)
    models = _load(found)
    found = without_data_files(found, models)
    out = check_output_folder(found, output) if output is not None else None
    reads = _check_writes(found, models, out, [Path(a) for a in adapters]) if out is not None else []
    hosts: dict[str, LoadedModel] = {}
    for name, model in models.items():
        try:
            hosts[name] = host_model(model)
        except LoraOnnxError as exc:
            raise model_label(name, exc) from exc
    routes = [_routes(found, hosts, adapter, skip_unmatched) for adapter in adapters]
    results: dict[str, MixedInjectResult] = {}
    warnings: list[str] = []
    for name, model in models.items():
        if not any(routing.files[name] for routing, _ in routes):
            continue
        sources: list[AdapterSource] = []
        try:
            for i, (adapter, (routing, parts)) in enumerate(zip(adapters, routes, strict=True)):
                taken = routing.files[name]
                label = f"PEFT {adapter}"
                if not taken:
                    sources.append(AdapterSource((), {}, label))
                    warnings.append(
                        f"{name}: adapter {i} ({adapter}) has no module in this file; its rows run this "
                        "file's base model"
                    )
                    continue
                source: str | os.PathLike = adapter
                chosen: Sequence[AdapterModule] | None = taken
                if parts is not None:
                    source, chosen = _part(adapter, parts[name]), None
                produced = peft_source(hosts[name], source, f"mixed_{i}", purpose=PURPOSE, modules=chosen)
                sources.append(AdapterSource(produced.plans, produced.values, label, produced.skipped))
                warnings.extend(f"{name}: {message}" for message in produced.warnings)
            results[name] = inject_mixed(
                model, sources, stacks_as_inputs=stacks_as_inputs, validate=validate, providers=providers,
                dims=dims, allow_nonfinite=allow_nonfinite, allow_empty=True,
            )  # fmt: skip
        except LoraOnnxError as exc:
            raise model_label(name, exc) from exc
        warnings.extend(f"{name}: {message}" for message in results[name].warnings)
    if not results:
        raise AdapterError(f"no model file of {found.root} carries a module of the adapters")
    skipped_keys: list[str] = []
    for i, (routing, _) in enumerate(routes):
        if routing.unmatched:
            paths = [module.full_path for module in routing.unmatched]
            warnings.append(
                f"adapter {i} ({adapters[i]}): skipped {len(routing.skipped_keys)} key(s) of {len(paths)} "
                f"module(s) no model file has (--skip-unmatched): {', '.join(paths)}"
            )
            skipped_keys.extend(routing.skipped_keys)
    ok = all(result.ok for result in results.values())
    files: list[FolderFile] = []
    for name, model in models.items():
        result = results.get(name)
        if result is None:
            warnings.append(f"{name} carries none of the adapters' modules: written unchanged")
        written = None
        if out is not None and ok:
            written = save_model(
                result.model if result is not None else model, out / name, protect=reads, link_data=link_data
            )
        taken = tuple(dict.fromkeys(m.full_path for routing, _ in routes for m in routing.files[name]))
        branches = len(result.branches) if result is not None else 0
        files.append(FolderFile(name, taken, branches, result, written))
    copied = copy_side_files(found, out, reads) if out is not None and ok else ()
    return FolderResult(
        found.root, tuple(files), out if ok else None, tuple(skipped_keys), copied, tuple(warnings),
        "inject --mixed",
    )  # fmt: skip
