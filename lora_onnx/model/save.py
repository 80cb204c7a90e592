"""Write a model atomically, bringing its external data, never touching an input.

Two ways to place external data, chosen per save:

- *reference / clone*: no external tensor changed (injection). An output in the input's folder refers
  to the input's data files as they are (nothing is copied, and later commands protect them as that
  output's inputs). An output elsewhere gets its own ``<out>.data`` (``<out>.data.N`` for several
  source files): a copy-on-write clone (reflink: btrfs, XFS, bcachefs) where the file system has one, as
  cheap as a link but a separate file, else a copy. Hard links only with ``link_data=True``: onnx >= 1.21
  (``onnx.load``, ``onnx.checker``) and onnx-ir refuse data files with more than one link ("potential
  hard link attack"), so while a linked output exists neither it nor the *input* loads in onnx
  (onnxruntime accepts both). New tensors of 1 KiB or more go to their own small ``<out>.lora.data``.
- *stream*: some external tensor changed (folding). One new ``<out>.data`` is written tensor by tensor:
  untouched ranges are copied by the kernel, changed tensors are computed one at a time (folds in
  blocks of a few MB, see :mod:`lora_onnx.model.streaming`). Peak memory is a few blocks, never the model.

Every file goes through :mod:`lora_onnx.common.atomic`: a temporary name, fsync, rename; the model file is
renamed last, and an older output's model file is removed before its data files are replaced, so an
interrupted run leaves the old model or no model, never a model with the wrong data. Any failure or
signal removes the temporary files; two writers of one output are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from lora_onnx.common import progress
from lora_onnx.common.atomic import (
    NAME_MAX,
    Staged,
    check_outputs,
    describe_os_error,
    make_folder,
    output_lock,
    same_entry,
)
from lora_onnx.errors import LoraOnnxError, OutputError
from lora_onnx.model.load import LoadedModel, all_tensors, load_model
from lora_onnx.model.streaming import StreamedTensor
from lora_onnx.model.tensors import ExternalRef, external_ref, make_tensor, nbytes, np_dtype, set_external_ref

#: Tensors at least this large leave the .onnx file when the model keeps data outside it (onnx's default).
EXTERNAL_THRESHOLD = 1024
#: Keep the protobuf well under its 2 GiB limit.
MAX_INLINE_BYTES = 1_800_000_000
_ALIGN = 4096
_COPY_CHUNK = 64 << 20


def sibling(output: Path, suffix: str) -> Path:
    """``<output name><suffix>`` beside ``output``; shortened (with a hash, so still unique) when that
    would exceed NAME_MAX, so every output name that fits gets its data files too."""
    name = output.name + suffix
    if len(os.fsencode(name)) <= NAME_MAX:
        return output.with_name(name)
    digest = hashlib.sha256(os.fsencode(output.name)).hexdigest()[:8]
    keep = os.fsencode(output.name)[: NAME_MAX - len(os.fsencode(suffix)) - 9]
    return output.with_name(keep.decode(errors="ignore") + "-" + digest + suffix)


def planned_writes(model: LoadedModel, output: str | os.PathLike) -> list[Path]:
    """Every file :func:`save_model` may write for ``model`` at ``output`` (the model file first)."""
    output = Path(output)
    locations = {ref.location for ref in model.external_refs().values()}
    data = sibling(output, ".data")
    numbered = [sibling(output, f".data.{n}") for n in range(len(locations))] if len(locations) > 1 else []
    return [output, data, *numbered, sibling(output, ".lora.data")]


def model_inputs(model: LoadedModel) -> list[Path]:
    """The files ``model`` was read from: its .onnx and every data file it references."""
    return [p for p in (model.path, *model.external_files()) if p is not None]


#: Models in an output's folder larger than this are not scanned for references (see _shared_data).
_SCAN_LIMIT = 64 << 20


def _shared_data(output: Path, writes: list[Path]) -> None:
    """Refuse to replace a data file that another model in the output's folder refers to.

    An output beside its input refers to the input's data file by name; writing a new file under that
    name (say, ``-o model.onnx`` from another base) would silently give that output other weights.
    """
    existing = {path.name for path in writes[1:] if path.exists()}
    if not existing:
        return
    for other in sorted(output.parent.glob("*.onnx")):
        if other.name == output.name or not other.is_file() or other.stat().st_size > _SCAN_LIMIT:
            continue
        try:
            proto = onnx.load(other, load_external_data=False)
        except Exception:  # not a model onnx can read: it refers to nothing
            continue
        for tensor in all_tensors(proto.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            # the location as written is what names the file (that model's own load checks the rest)
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location in existing:
                raise OutputError(
                    f"{other} refers to {output.parent / location}, which writing {output} would "
                    "replace; choose another output name (or move that model away first)"
                )


def check_output_paths(model: LoadedModel, output: str | os.PathLike, protect: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output whose model or data files would replace one of the inputs, or
    a data file another model beside it refers to, or a model output not named ``.onnx``."""
    writes = planned_writes(model, output)
    inputs = [*model_inputs(model), *protect]
    check_outputs(writes, inputs)
    _shared_data(Path(output), writes)
    check_model_suffix(Path(output), inputs)


def check_report_paths(
    reports: Iterable[str | os.PathLike | None],
    reads: Iterable[str | os.PathLike | None],
    models: Iterable[Path] = (),
) -> None:
    """Refuse, before any work, a report (``--report``, ``--junit``, ``--json``) that would replace one of
    ``reads`` or a data file of one of ``models``: those whose folder holds a report are read graph-only
    for their data files, the others need not be opened."""
    targets = [Path(r) for r in reports if r is not None]
    if not targets:
        return
    extra: list[Path] = []
    for model in models:
        folder = model.parent.resolve()
        if any(folder == t.parent.resolve() or folder in t.parent.resolve().parents for t in targets):
            with contextlib.suppress(LoraOnnxError):  # an unreadable model fails later, on its own
                extra.extend(model_inputs(load_model(model)))
    check_outputs(targets, [*reads, *extra])


#: Suffixes of adapter and data files: a model output named so is a mix-up; the suggestion swaps it.
_NOT_MODEL_SUFFIXES = (".onnx_adapter", ".safetensors", ".npz", ".data", ".json")


def check_model_suffix(output: Path, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a model output whose name does not end in ``.onnx``: ``-o x.onnx_adapter`` or
    ``-o model_lora`` would otherwise be written as a model without a word. The suggested name is
    never one of ``inputs``."""
    if output.name.lower().endswith(".onnx"):
        return
    swap = output.suffix.lower() in _NOT_MODEL_SUFFIXES
    suggestion = output.with_suffix(".onnx") if swap else output.with_name(f"{output.name}.onnx")
    if any(same_entry(suggestion, Path(path)) for path in inputs):
        suggestion = suggestion.with_name(f"{suggestion.name.removesuffix('.onnx')}_lora.onnx")
    raise OutputError(
        f"{output}: a model output must end in .onnx (adapter files are written by export-adapter or "
        f"inject --as-inputs --adapter-out FILE); name it {suggestion}"
    )


def save_model(
    model: LoadedModel, path: str | os.PathLike, *, protect: Iterable[Path] = (), link_data: bool = False
) -> Path:
    """Write ``model`` to ``path`` with its data (see the module doc); returns the output path.

    ``protect`` lists more files that must not be overwritten (the inputs of the command).
    ``link_data=True`` hard-links unchanged data files into another folder instead of cloning or copying
    them (fast, but onnx >= 1.21 then refuses to load the output and the input; onnxruntime does not).
    """
    output = Path(path)
    check_output_paths(model, output, protect)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    refs = model.external_refs()
    changed_external = any(name in refs for name in model.overrides)
    make_folder(output.parent)
    with output_lock(output):
        staged = Staged()
        try:
            if changed_external or (not refs and _inline_bytes(proto, model) > MAX_INLINE_BYTES):
                _stream_data(proto, model, refs, sibling(output, ".data"), staged)
            elif refs:
                _place_data(proto, model, refs, output, staged, link_data)
                _externalize_inline(proto, model, sibling(output, ".lora.data"), staged)
            else:
                _apply_inline_overrides(proto, model)
            model_temp = staged.temp_for(output)
            with open(model_temp, "xb") as out:
                out.write(proto.SerializeToString())
            _commit(staged, output)
        except OSError as exc:
            staged.discard()
            raise OutputError(describe_os_error(exc, output)) from exc
        except BaseException:
            staged.discard()
            raise
    return output


def serialize_in_place(model: LoadedModel) -> bytes | None:
    """``model`` as bytes onnxruntime can load while its external data stays where it is (in
    ``model.base_dir``, see :func:`lora_onnx.proofs.validation.create_session`): no file written, linked or
    copied. None when that cannot be: a fold changed an external tensor (its new value needs a data
    file), or the inline values would not fit one protobuf.
    """
    refs = model.external_refs()
    if any(name in refs for name in model.overrides):
        return None
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    if _inline_bytes(proto, model) > MAX_INLINE_BYTES:
        return None
    _apply_inline_overrides(proto, model)
    return proto.SerializeToString()


def _commit(staged: Staged, output: Path) -> None:
    def drop_old_model() -> None:
        # The old model refers to the data files about to be replaced: remove it first, so a crash in
        # between leaves no model rather than an old model with new data.
        if len(staged.renames) > 1 and output.exists():
            output.unlink()

    staged.commit(before_rename=drop_old_model)


def _deferred(tensor: onnx.TensorProto, model: LoadedModel) -> bool:
    """An inline initializer whose value an override produces at save time (a fold, a deferred LoRA init)."""
    return tensor.name in model.overrides and external_ref(tensor) is None


def _inline_bytes(proto: onnx.ModelProto, model: LoadedModel) -> int:
    """Bytes the .onnx file would hold with every inline value (deferred ones included) written into it."""
    return sum(
        nbytes(t) if _deferred(t, model) else len(t.raw_data)
        for t in all_tensors(proto.graph)
        if external_ref(t) is None
    )


def _apply_inline_overrides(proto: onnx.ModelProto, model: LoadedModel) -> None:
    for tensor in proto.graph.initializer:
        if _deferred(tensor, model):
            tensor.CopyFrom(make_tensor(tensor.name, model.overrides[tensor.name](), tensor.data_type))


def _clone_or_copy(source: Path, temp: Path, link: bool) -> None:
    if _reflink(source, temp):
        return
    if link:
        try:
            # link(2) links a symbolic link itself, not its target: a relative link would dangle beside
            # the output (an in-folder link to the data file is allowed, as onnxruntime allows it)
            os.link(source.resolve(), temp)
            return
        except OSError:
            pass  # another file system, or links not allowed: a copy is slower but just as correct
    with progress.step(f"copying {source.name}"):
        shutil.copyfile(source, temp)


_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def _reflink(source: Path, temp: Path) -> bool:
    """Clone ``source`` to ``temp`` sharing its blocks copy-on-write; False where unsupported (ext4)."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl  # POSIX only

    try:
        with open(source, "rb") as src, open(temp, "xb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        return True
    except OSError:
        temp.unlink(missing_ok=True)
        return False


def _same_folder(model: LoadedModel, output: Path) -> bool:
    try:
        return model.base_dir is not None and os.path.samefile(model.base_dir, output.parent)
    except OSError:
        return False


def _place_data(
    proto: onnx.ModelProto,
    model: LoadedModel,
    refs: dict[str, ExternalRef],
    output: Path,
    staged: Staged,
    link: bool,
) -> None:
    """Unchanged external data: referenced as it is beside the input, else cloned / copied (or linked)."""
    assert model.base_dir is not None
    if _same_folder(model, output):
        return  # the locations already resolve from the output's folder, and name no file we write
    locations = sorted({ref.location for ref in refs.values()})
    renamed: dict[str, str] = {}
    for number, location in enumerate(locations):
        final = sibling(output, ".data" if len(locations) == 1 else f".data.{number}")
        _clone_or_copy(model.base_dir / location, staged.temp_for(final), link)
        renamed[location] = final.name
    for tensor in all_tensors(proto.graph):
        ref = external_ref(tensor)
        if ref is not None:
            set_external_ref(tensor, ExternalRef(renamed[ref.location], ref.offset, ref.length))


def _externalize_inline(proto: onnx.ModelProto, model: LoadedModel, data_path: Path, staged: Staged) -> None:
    """Move inline initializers of EXTERNAL_THRESHOLD bytes or more to their own data file.

    Deferred values are produced here, one at a time, and written straight to the file: a rank-64 adapter
    on a large model never sits in memory whole.
    """
    out = None
    try:
        for tensor in proto.graph.initializer:
            if external_ref(tensor) is not None:
                continue
            deferred = _deferred(tensor, model)
            size = nbytes(tensor) if deferred else len(tensor.raw_data)
            if size < EXTERNAL_THRESHOLD:
                if deferred:
                    tensor.CopyFrom(
                        make_tensor(tensor.name, model.overrides[tensor.name](), tensor.data_type)
                    )
                continue
            if out is None:
                out = open(staged.temp_for(data_path), "xb")  # noqa: SIM115 (closed in finally)
            offset = _pad_to_alignment(out, size)
            if deferred:
                data = np.ascontiguousarray(model.overrides[tensor.name](), np_dtype(tensor.data_type))
                out.write(data.reshape(-1).view(np.uint8))
            else:
                out.write(tensor.raw_data)
            set_external_ref(tensor, ExternalRef(data_path.name, offset, size))
    finally:
        if out is not None:
            out.close()


def _pad_to_alignment(out, size: int) -> int:  # type: ignore[no-untyped-def]
    """Pad so a tensor of ``size`` bytes starts page-aligned (mmap-friendly); returns its offset."""
    position = out.tell()
    align = _ALIGN if size >= _ALIGN else 16
    padding = -position % align
    if padding:
        out.write(b"\0" * padding)
    return position + padding


def _stream_data(
    proto: onnx.ModelProto, model: LoadedModel, refs: dict[str, ExternalRef], data_path: Path, staged: Staged
) -> None:
    """Write every external (or large inline) tensor into one new data file, one tensor at a time."""
    tensors = [
        tensor
        for tensor in all_tensors(proto.graph)
        if external_ref(tensor) is not None
        or len(tensor.raw_data) >= EXTERNAL_THRESHOLD
        or tensor.name in model.overrides
    ]
    total = sum(nbytes(tensor) for tensor in tensors)
    with (
        open(staged.temp_for(data_path), "xb") as out,
        progress.step(f"writing {data_path.name}", total=total, unit="bytes") as advance,
    ):
        for tensor in tensors:
            ref = external_ref(tensor)
            size = nbytes(tensor)
            offset = _pad_to_alignment(out, size)
            producer = model.overrides.get(tensor.name)
            if isinstance(producer, StreamedTensor):
                # Computed and written block by block: memory stays a few chunks, not a tensor.
                if producer.write_into(out) != size:
                    raise ValueError(f"tensor {tensor.name!r}: streamed value does not match its metadata")
            elif producer is not None:
                values = np.ascontiguousarray(producer())
                out.write(values.tobytes())
            elif ref is not None:
                assert model.base_dir is not None
                _copy_range(model.base_dir / ref.location, ref.offset, size, out)
            else:
                out.write(tensor.raw_data)
            set_external_ref(tensor, ExternalRef(data_path.name, offset, size))
            advance(size)


def _copy_range(source: Path, offset: int, size: int, out) -> None:  # type: ignore[no-untyped-def]
    out.flush()
    with open(source, "rb") as src:
        remaining = size
        position = offset
        try:
            while remaining:
                copied = os.copy_file_range(src.fileno(), out.fileno(), remaining, position)
                if copied == 0:
                    raise OSError(errno.EIO, f"{source} ended early")
                position += copied
                remaining -= copied
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, None):
                raise
            src.seek(position)
            while remaining:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise OSError(errno.EIO, f"{source} ended early") from exc
                out.write(chunk)
                remaining -= len(chunk)
    out.seek(0, os.SEEK_END)
