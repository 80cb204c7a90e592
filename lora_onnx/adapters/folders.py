"""Model folders: the model files of an export folder, which adapter modules each file takes, side files.

A folder holds one or more model files: Optimum's split exports (``encoder_model.onnx``,
``decoder_model.onnx``, ``decoder_with_past_model.onnx``, or one ``model.onnx``), onnxruntime-genai model
folders (``model.onnx`` + ``model.onnx.data`` + ``genai_config.json``) and diffusers-style pipelines
(``unet/model.onnx``, ``text_encoder/model.onnx``, ...). Every ``*.onnx`` file in the folder or its
sub-folders is a model file (hidden names excepted); everything else, except the models' external data
files, is a side file that the output folder gets a copy of (configs, tokenizer files, ``scheduler/``).

Routing a PEFT adapter's modules (:func:`route_modules`):

- a module path starting with a component name (the sub-folder of a model file: ``unet.``,
  ``text_encoder.``, ``text_encoder_2.``; dotted for deeper folders) goes only to that component's models,
  with the prefix removed;
- any other module goes to every model file that has it, matched as for one model
  (:mod:`lora_onnx.adapters.peft.mapping`); where some files have the module under its own path and others
  only with a wrapper prefix of the adapter's path dropped, only the first take it (a seq2seq decoder's
  ``decoder.block.0...q`` lands in both decoder files, not in the encoder whose paths are
  ``block.0...q``), and one file may drop only one such prefix;
- in a pipeline folder (models in sub-folders) the dropped prefix is never a component's name, so
  ``text_encoder_2.`` keys cannot land in ``text_encoder/``; a key for a component the folder lacks
  (one of :data:`PIPELINE_COMPONENTS`) matches nothing;
- a model file that has a module but cannot adapt it (a node inside an If body, as in Optimum's
  ``decoder_model_merged.onnx``) is an error naming the file: leaving it unadapted would be a wrong answer;
- a module a file has only under onnxruntime-genai's builder names (``self_attn`` renamed ``attn``, q / k / v
  packed into ``qkv_proj``, :mod:`lora_onnx.adapters.peft.packed`) lands there as under its own path;
- every module must land in at least one file, else the usual unmatched-key error (listing the files
  tried), or, with ``skip_unmatched``, it is skipped and listed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from lora_onnx.adapters.peft.mapping import (
    AdapterModule,
    first_key,
    match_path,
    site_paths,
    unadaptable,
    unmatched_hint,
)
from lora_onnx.adapters.peft.packed import split_packed
from lora_onnx.common.atomic import check_outputs, same_entry, write_file
from lora_onnx.common.names import nearest
from lora_onnx.errors import AdapterError, LoraOnnxError, ModelLoadError, OutputError
from lora_onnx.model.load import LoadedModel
from lora_onnx.sites.find import SiteScan

#: diffusers pipeline components a LoRA file may prefix its keys with; in a pipeline folder such a prefix
#: never matches another component (nor a wrapper prefix), even when the folder lacks that component.
PIPELINE_COMPONENTS = frozenset(
    {
        "unet",
        "transformer",
        "prior",
        "controlnet",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "vae",
        "vae_encoder",
        "vae_decoder",
    }
)


@dataclass(frozen=True)
class ModelFolder:
    """The model files of a folder (``models``: paths relative to ``root``, POSIX separators) and the side
    files an output folder gets a copy of (``side_files``, relative too)."""

    root: Path
    models: tuple[str, ...]
    side_files: tuple[str, ...] = ()

    def path(self, relative: str) -> Path:
        return self.root / relative

    def component(self, model: str) -> str:
        """The pipeline component of a model file: its folder as a dotted name ("" at the top level)."""
        parent = model.rpartition("/")[0]
        return parent.replace("/", ".")

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for c in map(self.component, self.models) if c))

    @property
    def pipeline(self) -> bool:
        """True when model files sit in sub-folders (a diffusers-style pipeline)."""
        return bool(self.components)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def find_models(source: str | os.PathLike | Sequence[str | os.PathLike]) -> ModelFolder:
    """The :class:`ModelFolder` of a folder, or of several model files (then relative to their common
    folder, with no side files: the files given are the whole input)."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise ModelLoadError(f"{root} is not a folder")
        models: list[str] = []
        others: list[str] = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            for name in sorted(files):
                if _hidden(name):
                    continue
                relative = (Path(folder) / name).relative_to(root).as_posix()
                (models if name.endswith(".onnx") else others).append(relative)
        if not models:
            raise ModelLoadError(f"{root} holds no .onnx model files (nor do its sub-folders)")
        return ModelFolder(root, tuple(models), tuple(others))
    files = [Path(p) for p in source]
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"{file} is not a model file")
    root = Path(os.path.commonpath([os.path.abspath(f.parent) for f in files]))
    relative = [Path(os.path.abspath(f)).relative_to(root).as_posix() for f in files]
    if len(set(relative)) < len(relative):
        raise ModelLoadError(f"a model file is given twice: {', '.join(relative)}")
    return ModelFolder(root, tuple(relative))


def without_data_files(folder: ModelFolder, models: Mapping[str, LoadedModel]) -> ModelFolder:
    """``folder`` without the models' external data files among its side files (each output model gets
    its own data, written the way single-model outputs get theirs)."""
    data = [path for model in models.values() for path in model.external_files()]
    side = tuple(
        name for name in folder.side_files if not any(same_entry(folder.path(name), path) for path in data)
    )
    return dataclasses.replace(folder, side_files=side)


def check_output_folder(folder: ModelFolder, output: str | os.PathLike) -> Path:
    """Refuse an output folder that is the input folder or inside it; the output folder's path."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; a folder input needs an output folder (-o DIR)")
    if out.suffix == ".onnx":
        raise OutputError(f"-o {out}: a folder of models is written to a folder, not to one .onnx file")
    root, target = folder.root.resolve(), out.resolve()
    if target == root or root in target.parents:
        raise OutputError(
            f"refusing to write into the input folder {folder.root}; choose an output folder outside it"
        )
    return out


def copy_side_files(folder: ModelFolder, output: Path, protect: Iterable[Path] = ()) -> tuple[Path, ...]:
    """Copy every side file to the same place under ``output`` (atomically, each; links followed)."""
    sources = [folder.path(name) for name in folder.side_files]
    targets = [output / name for name in folder.side_files]
    check_outputs(targets, [*sources, *protect])
    for source, target in zip(sources, targets, strict=True):
        if not source.is_file():
            raise ModelLoadError(f"{source} is not a readable file (a broken link?); nothing more was copied")

        def produce(temp: Path, source: Path = source) -> None:
            shutil.copyfile(source, temp)

        write_file(target, produce, "copy")
    return tuple(targets)


@dataclass(frozen=True)
class Routing:
    """Which adapter modules each model file takes (``files``: model -> modules, their paths relative to
    that model, component prefixes removed) and the modules no file took (``unmatched``)."""

    files: Mapping[str, tuple[AdapterModule, ...]]
    unmatched: tuple[AdapterModule, ...] = ()
    #: One line per unmatched module, saying why (for the error and the report).
    reasons: tuple[str, ...] = ()
    by_module: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "by_module", MappingProxyType(dict(self.by_module)))

    @property
    def skipped_keys(self) -> tuple[str, ...]:
        return tuple(key for module in self.unmatched for key in module.keys.values())


def _component_of(path: str, components: Sequence[str]) -> str:
    owners = [c for c in components if path.startswith(c + ".")]
    return max(owners, key=len) if owners else ""


def route_modules(
    folder: ModelFolder,
    modules: Sequence[AdapterModule],
    scans: Mapping[str, SiteScan],
    *,
    source: str = "",
    skip_unmatched: bool = False,
) -> Routing:
    """Give each adapter module to the model files that carry it (see the module doc for the rules)."""
    components = folder.components
    reserved = set(components) | (PIPELINE_COMPONENTS if folder.pipeline else set())
    taken: dict[str, list[AdapterModule]] = {model: [] for model in folder.models}
    prefixes: dict[str, dict[str, str]] = {model: {} for model in folder.models}
    by_module: dict[str, tuple[str, ...]] = {}
    unmatched: list[AdapterModule] = []
    reasons: list[str] = []
    for module in modules:
        component = _component_of(module.path, components)
        if component:
            candidates = [m for m in folder.models if folder.component(m) == component]
            local = dataclasses.replace(
                module, path=module.path[len(component) + 1 :], prefix=component + "."
            )
        else:
            candidates = list(folder.models)
            local = module
            head = module.path.split(".", 1)[0]
            if folder.pipeline and head in PIPELINE_COMPONENTS:
                unmatched.append(module)
                reasons.append(
                    f"{source}: key {first_key(module)!r} is for pipeline component {head!r}, which "
                    f"{folder.root} does not have (its components: {', '.join(components)})"
                )
                continue
        found: dict[str, tuple[int, str]] = {}
        for model in candidates:
            where = f"{source} (model {model})"
            paths = list(site_paths(scans[model])[local.kind])
            match = match_path(local, paths, where)
            if match is not None and match[1] and match[1].split(".", 1)[0] in reserved:
                match = None  # a component's name is never a wrapper to drop
            if match is not None:
                found[model] = (1 if match[1] else 0, match[1])
                continue
            if _builder_carries(local, scans[model], where):
                found[model] = (0, "")
                continue
            reason = unadaptable(local, scans[model], where)
            if reason is not None:
                raise AdapterError(
                    f"{reason}; that model file would run without the adapter: leave it out of the folder "
                    "(Optimum: export with --no-post-process, which makes no decoder_model_merged.onnx)"
                )
        if not found:
            unmatched.append(module)
            reasons.append(_unmatched_reason(folder, module, local, candidates, scans, source))
            continue
        best = min(quality for quality, _ in found.values())
        chosen = tuple(model for model, (quality, _) in found.items() if quality == best)
        for model in chosen:
            taken[model].append(local)
            dropped = found[model][1]
            if dropped:
                prefixes[model].setdefault(dropped, first_key(module))
        by_module[module.full_path] = chosen
    for model, dropped in prefixes.items():
        if len(dropped) > 1:
            (one, key_one), (two, key_two) = list(dropped.items())[:2]
            raise AdapterError(
                f"{source}: model {model} would take modules of two different parts of the adapter "
                f"({key_one!r} with {one!r} dropped, {key_two!r} with {two!r} dropped); its module paths "
                "do not say which part it is: apply the adapter to that file alone, keeping only that part"
            )
    if unmatched and not skip_unmatched:
        raise AdapterError(reasons[0] + unmatched_hint(unmatched))
    files = {model: tuple(mods) for model, mods in taken.items()}
    return Routing(files, tuple(unmatched), tuple(reasons), by_module)


def _builder_carries(module: AdapterModule, scan: SiteScan, source: str) -> bool:
    """Whether the file has ``module`` only under onnxruntime-genai's builder names: renamed
    (``self_attn`` -> ``attn``) or as a member of a packed projection (q / k / v on ``qkv_proj``); the
    single-model planning applies it there (:mod:`lora_onnx.adapters.peft.packed`)."""
    kept, packed = split_packed(scan, [module], source=source)
    return bool(packed) or (bool(kept) and kept[0].path != module.path)


def _unmatched_reason(
    folder: ModelFolder,
    module: AdapterModule,
    local: AdapterModule,
    candidates: Sequence[str],
    scans: Mapping[str, SiteScan],
    source: str,
) -> str:
    paths = sorted({p for model in candidates for p in site_paths(scans[model])[local.kind]})
    hint = "; nearest module paths: " + ", ".join(nearest(local.path, paths, dotted=True)) if paths else ""
    return (
        f"{source}: key {first_key(module)!r} matches no module of the model files of {folder.root} "
        f"(tried {', '.join(candidates)}){hint}"
    )


def model_label(model: str, error: LoraOnnxError) -> LoraOnnxError:
    """``error`` with the model file named in front, unless its message already names it."""
    message = str(error)
    if model in message:
        return error
    try:
        labelled = type(error)(f"{model}: {message}")
    except TypeError:  # a subclass with other constructor arguments: the plain error class
        labelled = LoraOnnxError(f"{model}: {message}")
    labelled.exit_code = error.exit_code
    return labelled
