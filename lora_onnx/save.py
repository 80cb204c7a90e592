"""Write a model atomically, bringing its external data, never touching an input.

Two ways to place external data, chosen per save:

- *link*: no external tensor changed (injection). Each source data file is hard-linked next to the
  output as ``<out>.data`` (copied when a link is impossible) and locations are rewritten to it, so the
  output folder is self-contained and nothing points back through ``..``. New tensors of 1 KiB or more
  go to their own small ``<out>.lora.data``. A copy-on-write clone (reflink: btrfs, XFS, bcachefs) is
  tried first: as cheap as a link, but a separate file. onnx >= 1.21 refuses external data files with
  several hard links in ``onnx.load`` and ``onnx.checker`` (onnxruntime accepts them), so
  ``link_data=False`` copies instead of linking where no clone is possible.
- *stream*: some external tensor changed (folding). One new ``<out>.data`` is written tensor by tensor:
  untouched ranges are copied by the kernel, changed tensors are computed one at a time (folds in
  blocks of a few MB, see :mod:`lora_onnx.streaming`). Peak memory is a few blocks, never the model.

Every file is written to a temporary name and renamed into place; the model file is renamed last, and
an older output's model file is removed before its data files are replaced, so an interrupted run leaves
the old model or no model, never a model with the wrong data. Any failure removes the temporary files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lora_onnx.errors import OutputError
from lora_onnx.load import LoadedModel, all_tensors
from lora_onnx.streaming import StreamedTensor
from lora_onnx.tensors import ExternalRef, external_ref, make_tensor, nbytes, np_dtype, set_external_ref

#: Tensors at least this large leave the .onnx file when the model keeps data outside it (onnx's default).
EXTERNAL_THRESHOLD = 1024
#: Keep the protobuf well under its 2 GiB limit.
MAX_INLINE_BYTES = 1_800_000_000
_ALIGN = 4096
_COPY_CHUNK = 64 << 20


@dataclass
class _Staged:
    """Temporary files written so far and the final names they take on commit."""

    renames: list[tuple[Path, Path]] = field(default_factory=list)

    def temp_for(self, final: Path) -> Path:
        temp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.renames.append((temp, final))
        return temp

    def discard(self) -> None:
        for temp, _ in self.renames:
            temp.unlink(missing_ok=True)


def _same_entry(output: Path, protected: Path) -> bool:
    """True when ``output`` names the same directory entry as ``protected`` (not merely a hard link:
    outputs are renamed into place, so replacing a hard link of an input leaves the input intact)."""
    if output.resolve() == protected.resolve():
        return True
    try:  # case-insensitive file systems: another spelling of the same entry
        return (
            output.name.lower() == protected.name.lower()
            and os.path.samefile(output.parent, protected.parent)
            and os.path.samefile(output, protected)
        )
    except OSError:
        return False


def check_output_path(output: Path, inputs: Iterable[Path]) -> None:
    """Refuse to write over any of ``inputs``: the same path, or another spelling of the same folder entry.

    Writes replace folder entries (temp file + rename), never file contents, so only the entry matters:
    an earlier output's data file is a hard link to the input's data, and replacing it leaves the input
    alone.
    """
    for protected in inputs:
        if _same_entry(output, protected):
            raise OutputError(f"refusing to overwrite the input {protected}; choose another output path")


def check_output_paths(model: LoadedModel, output: str | os.PathLike, protect: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output whose model or data files would replace one of the inputs."""
    output = Path(output)
    inputs = [p for p in (model.path, *model.external_files(), *protect) if p is not None]
    for suffix in ("", ".data", ".lora.data"):
        check_output_path(output.with_name(output.name + suffix), inputs)
    check_model_suffix(output, inputs)


#: Suffixes of adapter and data files: a model output named so is a mix-up; the suggestion swaps it.
_NOT_MODEL_SUFFIXES = (".onnx_adapter", ".safetensors", ".npz", ".data", ".json")


def check_model_suffix(output: Path, inputs: Iterable[Path] = ()) -> None:
    """Refuse a model output whose name does not end in ``.onnx``: ``-o x.onnx_adapter`` or
    ``-o model_lora`` would otherwise be written as a model without a word. The suggested name is
    never one of ``inputs``."""
    if output.name.lower().endswith(".onnx"):
        return
    swap = output.suffix.lower() in _NOT_MODEL_SUFFIXES
    suggestion = output.with_suffix(".onnx") if swap else output.with_name(f"{output.name}.onnx")
    if any(_same_entry(suggestion, path) for path in inputs):
        suggestion = suggestion.with_name(f"{suggestion.name.removesuffix('.onnx')}_lora.onnx")
    raise OutputError(
        f"{output}: a model output must end in .onnx (adapter files are written by export-adapter or "
        f"inject --as-inputs --adapter-out FILE); name it {suggestion}"
    )


def save_model(
    model: LoadedModel, path: str | os.PathLike, *, protect: Iterable[Path] = (), link_data: bool = True
) -> Path:
    """Write ``model`` to ``path`` with its data (see the module doc); returns the output path.

    ``protect`` lists more files that must not be overwritten (the inputs of the command).
    ``link_data=False`` copies unchanged data files rather than hard-linking them (a clone is still used
    where the file system has one).
    """
    output = Path(path)
    check_output_paths(model, output, protect)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    refs = model.external_refs()
    changed_external = any(name in refs for name in model.overrides)
    data_name, lora_name = f"{output.name}.data", f"{output.name}.lora.data"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {output.parent}: {exc.strerror}") from exc

    staged = _Staged()
    try:
        if changed_external or (not refs and _inline_bytes(proto, model) > MAX_INLINE_BYTES):
            _stream_data(proto, model, refs, output.with_name(data_name), staged)
        elif refs:
            _link_data(proto, model, refs, output.with_name(data_name), staged, link_data)
            _externalize_inline(proto, model, output.with_name(lora_name), staged)
        else:
            _apply_inline_overrides(proto, model)
        model_temp = staged.temp_for(output)
        model_temp.write_bytes(proto.SerializeToString())
        _commit(staged, output)
    except OSError as exc:
        staged.discard()
        raise OutputError(_describe_os_error(exc, output)) from exc
    except BaseException:
        staged.discard()
        raise
    return output


def _describe_os_error(exc: OSError, output: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {output}; nothing was written"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {output}: {exc.strerror} (is the folder read-only?); nothing was written"
    return f"cannot write {output}: {exc.strerror or exc}; nothing was written"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _commit(staged: _Staged, output: Path) -> None:
    # A rename is atomic for processes, but after a power loss or kernel crash a renamed file whose data
    # never reached the disk can show up empty or partial. Flush every temp file before any rename.
    for temp, _ in staged.renames:
        _fsync(temp)
    data_renames = staged.renames[:-1]
    if data_renames and output.exists():
        # The old model refers to the data files about to be replaced: remove it first, so a crash in
        # between leaves no model rather than an old model with new data.
        output.unlink()
    for temp, final in staged.renames:
        os.replace(temp, final)
        # rename() between two links of one file does nothing (POSIX): the final name already holds
        # exactly these bytes, so the temporary link just goes.
        temp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the renames durable; not every platform can sync a folder
        _fsync(output.parent)


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


def _link_or_copy(source: Path, temp: Path, link: bool = True) -> None:
    if _reflink(source, temp):
        return
    if link:
        try:
            os.link(source, temp)
            return
        except OSError:
            pass  # another file system, or links not allowed: a copy is slower but just as correct
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


def _link_data(
    proto: onnx.ModelProto,
    model: LoadedModel,
    refs: dict[str, ExternalRef],
    data_path: Path,
    staged: _Staged,
    link: bool = True,
) -> None:
    assert model.base_dir is not None
    locations = sorted({ref.location for ref in refs.values()})
    renamed: dict[str, str] = {}
    for number, location in enumerate(locations):
        final = data_path if len(locations) == 1 else data_path.with_name(f"{data_path.name}.{number}")
        _link_or_copy(model.base_dir / location, staged.temp_for(final), link)
        renamed[location] = final.name
    for tensor in all_tensors(proto.graph):
        ref = external_ref(tensor)
        if ref is not None:
            set_external_ref(tensor, ExternalRef(renamed[ref.location], ref.offset, ref.length))


def _externalize_inline(proto: onnx.ModelProto, model: LoadedModel, data_path: Path, staged: _Staged) -> None:
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
                out = open(staged.temp_for(data_path), "wb")  # noqa: SIM115 (closed in finally)
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
    proto: onnx.ModelProto, model: LoadedModel, refs: dict[str, ExternalRef], data_path: Path, staged: _Staged
) -> None:
    """Write every external (or large inline) tensor into one new data file, one tensor at a time."""
    with open(staged.temp_for(data_path), "wb") as out:
        for tensor in all_tensors(proto.graph):
            ref = external_ref(tensor)
            if (
                ref is None
                and len(tensor.raw_data) < EXTERNAL_THRESHOLD
                and tensor.name not in model.overrides
            ):
                continue
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
