"""Compute a changed weight block by block while it is written, so memory never holds a whole tensor.

Folding changes most of a model's bytes, and the largest tensor of an LLM (its ``lm_head`` or embedding)
can be 10% of the model or more, so "one tensor at a time" is not enough. A :class:`StreamedTensor` is a
new tensor value described by a ``fill(r0, r1, out)`` function that writes rows ``r0:r1`` (leading axis)
in float32 into a buffer. :mod:`lora_onnx.model.save` calls :meth:`StreamedTensor.write_into` with the output
data file: a few reusable buffers of :data:`CHUNK_BYTES` each are filled, cast and written in turn,
so peak memory is a few chunks whatever the tensor's size, and no fresh pages are faulted in per tensor
(on virtual machines, first-touching gigabytes of new memory costs more than the arithmetic). What a
tensor needs besides its rows (LoRA A and B, quantization scales) is loaded when its write starts and
dropped when it ends. Called without arguments, a :class:`StreamedTensor` returns the whole array (it
is a ``TensorProducer``).

Rows are read from disk with ``readinto`` into the reused buffer (no page-cache mapping that would count
against the process). :func:`lora_onnx.kinds.deltas.folded_weight` builds the ``W + sum(s * delta)`` of a
fold this way for dense and conv branches in any source layout, the deltas' rows coming from
:mod:`lora_onnx.kinds.deltas`;
quantized sources plug in their own row readers
(:mod:`lora_onnx.sites.quantized`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from lora_onnx.model.load import LoadedModel
from lora_onnx.model.tensors import external_ref, np_dtype, shape_of

#: Size of one working buffer; a fold holds about three (rows, delta, cast). 1 MiB measured fastest on
#: a 2-core VM: blocks stay in cache, and the kernel's write path slows down sharply for larger writes.
CHUNK_BYTES = 1 << 20

#: Writes float32 rows ``r0:r1`` of a tensor into ``out`` (shape ``(r1 - r0, *shape[1:])``); ``scratch``
#: is a flat float32 buffer of at least ``out.size`` elements the function may overwrite.
RowFill = Callable[[int, int, np.ndarray, np.ndarray], None]
#: Blocks alive at once while writing: one being written, one queued, one being computed.
_IN_FLIGHT = 3


class RowSource(Protocol):
    """Reads rows of a tensor, converted to float32, into a caller's buffer."""

    shape: tuple[int, ...]

    def read_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None: ...


class StreamedTensor:
    """A tensor value of ``shape`` and ``dtype`` produced in row blocks (see the module doc).

    ``prepare()`` is called once per write and returns the :data:`RowFill`; whatever it loads (LoRA
    tensors, scales) lives only while that tensor is written, because a fold creates the producers of
    every changed weight at once.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        prepare: Callable[[], RowFill],
        chunk_bytes: int | None = None,
    ) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.prepare = prepare
        row_elems = math.prod(self.shape[1:])
        self.rows_per_chunk = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, row_elems * 4))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __call__(self) -> np.ndarray:
        """The whole value (for small models and in-memory use; saving streams instead)."""
        result = np.empty(self.shape, self.dtype)
        for r0, r1, block in self._blocks():
            result[r0:r1] = block
        return result

    def write_into(self, out: BinaryIO) -> int:
        """Write the value's bytes at ``out``'s position, block by block; returns the bytes written.

        A writer thread writes block i while block i + 1 is read and computed (both release the GIL),
        so the kernel's copy into the page cache overlaps the arithmetic.
        """
        pending: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=_IN_FLIGHT - 2)
        failures: list[BaseException] = []

        def writer() -> None:
            while (item := pending.get()) is not None:
                if not failures:
                    try:
                        out.write(item)
                    except BaseException as exc:  # raised in the caller's thread below
                        failures.append(exc)

        thread = threading.Thread(target=writer, name="lora-onnx-writer", daemon=True)
        thread.start()
        written = 0
        try:
            for _, _, block in self._blocks(buffers=_IN_FLIGHT):
                if failures:
                    break
                pending.put(block.reshape(-1).view(np.uint8))
                written += block.nbytes
        finally:
            pending.put(None)
            thread.join()
        if failures:
            raise failures[0]
        return written

    def _blocks(self, buffers: int = 1):  # type: ignore[no-untyped-def]
        with single_threaded_blas():
            yield from self._blocks_unguarded(buffers)

    def _blocks_unguarded(self, buffers: int):  # type: ignore[no-untyped-def]
        """Yield (r0, r1, block); a block's buffer is reused ``buffers`` blocks later."""
        fill = self.prepare()
        if not self.shape:
            work = np.empty((1,), np.float32)
            fill(0, 1, work, np.empty(1, np.float32))
            yield 0, 1, work.reshape(()).astype(self.dtype)
            return
        rows = self.shape[0]
        step = self.rows_per_chunk
        shape = (min(step, rows), *self.shape[1:])
        count = min(buffers, -(-rows // step))
        # float32 work buffers are what gets written unless a cast buffer takes the value's own type
        works = [np.empty(shape, np.float32) for _ in range(1 if self.dtype != np.float32 else count)]
        casts = [np.empty(shape, self.dtype) for _ in range(count if self.dtype != np.float32 else 0)]
        scratch = np.empty(works[0].size, np.float32)
        for i, r0 in enumerate(range(0, rows, step)):
            r1 = min(rows, r0 + step)
            block = works[i % len(works)][: r1 - r0]
            fill(r0, r1, block, scratch)
            if casts:
                cast = casts[i % len(casts)][: r1 - r0]
                np.copyto(cast, block, casting="unsafe")
                block = cast
            yield r0, r1, block


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's OpenBLAS on one thread inside the block (best effort, restored afterwards).

    A fold's products are small (a block of rows times a rank-r matrix). OpenBLAS splits them over
    threads that spin while they wait; on a busy machine that multiplied a 2.6 GB merge's CPU time by
    ten. Nothing happens when numpy uses another BLAS or the library cannot be found.
    """
    blas = _openblas()
    if blas is None:
        yield
        return
    get, set_ = blas
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


@functools.cache
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    try:
        np.ones((2, 2)) @ np.ones((2, 2))  # make sure numpy's BLAS is loaded
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
        for path in paths:
            library = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
                get = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    set_.argtypes = [ctypes.c_int]
                    return get, set_
    except OSError:
        pass  # no /proc (not Linux) or a library that cannot be opened: leave BLAS as it is
    return None


class ArrayRows:
    """Rows of an in-memory array (inline tensors, overridden values)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.shape = tuple(values.shape)

    def read_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        np.copyto(out, self.values[r0:r1], casting="unsafe")


class FileRows:
    """Rows of an external tensor, read with ``readinto`` straight into the caller's buffer."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, np.dtype(dtype)
        self.row_bytes = math.prod(shape[1:]) * self.dtype.itemsize

    def read_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        size = (r1 - r0) * self.row_bytes
        # float32 lands in place; narrower types are read into the scratch buffer, then converted.
        target = (out.reshape(-1) if self.dtype == np.float32 else scratch).view(np.uint8)[:size]
        with open(self.path, "rb", buffering=0) as file:
            file.seek(self.offset + r0 * self.row_bytes)
            view = memoryview(target)
            done = 0
            while done < size:
                count = file.readinto(view[done:])
                if not count:
                    raise OSError(f"{self.path} ended early")
                done += count
        if self.dtype != np.float32:
            np.copyto(out.reshape(-1), target.view(self.dtype), casting="unsafe")


def tensor_rows(model: LoadedModel, name: str) -> RowSource:
    """A row reader for initializer ``name`` of ``model`` (external tensors are read from disk)."""
    tensor = model.initializer(name)
    ref = external_ref(tensor)
    dtype = np_dtype(tensor.data_type)
    # float64 rows would not fit the float32 scratch buffer FileRows reads narrower types into.
    if name in model.overrides or ref is None or model.base_dir is None or dtype.itemsize > 4:
        return ArrayRows(np.asarray(model.array(name)))
    return FileRows(model.base_dir / ref.location, ref.offset, shape_of(tensor), dtype)


@dataclass(frozen=True)
class FloatSource:
    """A weight's float value before folding when it is not simply the initializer's (a quantized one):
    its shape and element type, and how to open a row reader for it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    open: Callable[[], RowSource]
