"""The one way lora-onnx writes files: temp file in the same folder, fsync, rename; never over an input.

- :func:`check_outputs` refuses, before any work, a write whose path is one of the files the command
  reads (compared as folder entries, through symlinks and ``..``) or whose name the file system cannot
  hold.
- :class:`Staged` collects temporary files and renames them into place on :meth:`Staged.commit`; any
  failure, an exception or a signal turned into one (:func:`signals_as_exceptions`) removes them.
- Temporary names are short and carry their writer: ``.lo-<pid>-<start>-<random>.<tag>.tmp``, where
  ``<start>`` is the process's start time (so a reused pid after a reboot is not mistaken for the
  writer). A run killed by SIGKILL cannot clean up; the next write into that folder removes the temporary
  files of exactly this pattern whose writer is gone (:func:`reclaim_stale`), never anyone else's.
- :func:`output_lock` serialises two writers of one output (``fcntl.flock`` on a hidden lock file, removed
  afterwards), so the result is always one writer's whole output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lora_onnx.errors import OutputError

#: Longest file name most file systems take (bytes); ``os.pathconf`` refines it where it can.
NAME_MAX = 255
#: Temporary files of this module: ``.lo-<pid>-<start>-<random>[.<tag>].tmp``.
TEMP_PATTERN = re.compile(r"^\.lo-(\d+)-(\d+)-[0-9a-f]{8}(?:\.[A-Za-z0-9_]{1,12})?\.tmp$")
#: Lock files of this module: ``.lo-<hash of the output's name>.lock``.
LOCK_PATTERN = re.compile(r"^\.lo-[0-9a-f]{16}\.lock$")

#: Temporary files of this process not yet renamed or removed (a signal handler removes them).
_LIVE: set[Path] = set()
#: Folders already swept for stale temporary files by this process.
_RECLAIMED: set[Path] = set()


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised in the main thread so writers unwind and remove their temporary files."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_HAS_PROC = os.path.isdir("/proc/self")


def _start_token(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown, None if it is gone."""
    if not _HAS_PROC:
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        return 0
    if fields[0] == b"Z":  # a zombie writes nothing any more
        return None
    return int(fields[19])


_OWN: dict[int, int] = {}


def _own_token() -> int:
    """This process's token (looked up per pid: a forked worker has its own start time)."""
    pid = os.getpid()
    if pid not in _OWN:
        _OWN[pid] = _start_token(pid) or 0
    return _OWN[pid]


def _writer_alive(pid: int, token: int) -> bool:
    if pid == os.getpid():
        return token == _own_token()  # this process, or a previous holder of its pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    except OSError:
        return True
    current = _start_token(pid)
    if current is None:
        return False
    return not (token and current and current != token)


def temp_name(final: Path) -> Path:
    """A short temporary name beside ``final`` (it fits whenever ``final``'s folder does)."""
    tag = re.sub(r"[^A-Za-z0-9_]", "", final.suffix)[:12]
    tail = f".{tag}" if tag else ""
    return final.with_name(f".lo-{os.getpid()}-{_own_token()}-{secrets.token_hex(4)}{tail}.tmp")


def reclaim_stale(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` left by writers of this module that are gone (SIGKILL,
    power loss); files of other naming and of live writers stay. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = TEMP_PATTERN.match(name)
        if match is None or _writer_alive(int(match[1]), int(match[2])):
            continue
        path = folder / name
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _reclaim_once(folder: Path) -> None:
    key = Path(os.path.abspath(folder))
    if key not in _RECLAIMED:
        _RECLAIMED.add(key)
        reclaim_stale(folder)


def discard_live() -> None:
    """Remove every temporary file this process has not committed yet (signal handlers, last resort)."""
    for path in list(_LIVE):
        with contextlib.suppress(OSError):
            path.unlink()
        _LIVE.discard(path)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class Staged:
    """Temporary files written so far and the final names they take on :meth:`commit`."""

    renames: list[tuple[Path, Path]] = field(default_factory=list)

    def temp_for(self, final: Path) -> Path:
        """A new temporary path for ``final`` (registered first, so a signal can remove it)."""
        _reclaim_once(final.parent)
        temp = temp_name(final)
        _LIVE.add(temp)
        self.renames.append((temp, final))
        return temp

    def discard(self) -> None:
        for temp, _ in self.renames:
            temp.unlink(missing_ok=True)
            _LIVE.discard(temp)

    def commit(self, before_rename: Callable[[], None] | None = None) -> None:
        """Flush every temporary file, then rename each into place (in order; the last is the main file).

        After a power loss a renamed file whose data never reached the disk can show up empty, so every
        file is synced before the first rename. ``before_rename`` runs after the sync, before the renames.
        """
        for temp, _ in self.renames:
            _fsync(temp)
        if before_rename is not None:
            before_rename()
        folders = set()
        for temp, final in self.renames:
            os.replace(temp, final)
            # rename() between two links of one file does nothing (POSIX): the final name already holds
            # exactly these bytes, so the temporary link just goes.
            temp.unlink(missing_ok=True)
            _LIVE.discard(temp)
            folders.add(final.parent)
        for folder in folders:
            with contextlib.suppress(OSError):  # durable renames; not every platform can sync a folder
                _fsync(folder)


def describe_os_error(exc: OSError, output: Path, what: str = "") -> str:
    """One line for a failed write of ``output``."""
    target = f"the {what} {output}" if what else str(output)
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {target}; nothing was written"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {target}: {exc.strerror} (is the folder read-only?); nothing was written"
    if exc.errno == errno.ENAMETOOLONG:
        return f"cannot write {target}: its name is too long for the file system; nothing was written"
    return f"cannot write {target}: {exc.strerror or exc}; nothing was written"


def make_folder(folder: Path) -> None:
    """Create an output folder (and its parents), or raise a one-line :class:`OutputError`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder}: {exc.strerror}") from exc


def write_file(
    path: str | os.PathLike, produce: bytes | Callable[[Path], None], what: str = "", *, lock: bool = True
) -> Path:
    """Write one file atomically: ``produce`` is its bytes, or writes the temporary path it is given.

    Makes the folder, serialises with other writers of ``path`` (:func:`output_lock`), and turns OS errors
    into a one-line :class:`OutputError` (``what`` names the file: "report", "adapter file").
    """
    target = Path(path)
    check_name_fits(target)
    make_folder(target.parent)
    with output_lock(target) if lock else contextlib.nullcontext():
        staged = Staged()
        try:
            temp = staged.temp_for(target)
            if isinstance(produce, bytes):
                with open(temp, "xb") as out:
                    out.write(produce)
            else:
                produce(temp)
            staged.commit()
        except OSError as exc:
            staged.discard()
            raise OutputError(describe_os_error(exc, target, what)) from exc
        except BaseException:
            staged.discard()
            raise
    return target


# --- locks -------------------------------------------------------------------------------------------


def lock_path(output: Path) -> Path:
    """The hidden lock file of ``output`` (a hash of its name, so any name that fits gets one)."""
    digest = hashlib.sha256(os.fsencode(output.name)).hexdigest()[:16]
    return output.with_name(f".lo-{digest}.lock")


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` while writing it; a second writer waits for the first.

    The lock file is removed afterwards. A writer that wakes up on a lock file already removed (and maybe
    re-created by a third) retries on the current one, so two writers never both hold "the" lock. A
    killed writer's lock is released by the kernel; its empty file is reused and removed by the next one.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, writes stay atomic
        yield
        return
    path = lock_path(output)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(describe_os_error(exc, output)) from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(descriptor)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # the file we locked was removed by the previous holder: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(descriptor)


# --- signals ------------------------------------------------------------------------------------------

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise_terminated(signum: int, frame: object) -> None:
    discard_live()
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise :class:`Terminated` (after removing live temporary files), so the
    run unwinds like Ctrl-C (KeyboardInterrupt) and leaves nothing behind. Main thread only; elsewhere a
    no-op."""
    previous = {}
    try:
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, _raise_terminated)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- the guard: no output over an input ----------------------------------------------------------------


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return NAME_MAX


def check_name_fits(path: Path) -> None:
    """Refuse a path with a component longer than the file system takes (before any work)."""
    limit = _name_max(path.parent)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise OutputError(
                f"the output name {part[:40]}... is {size} bytes; the file system takes at most {limit} "
                "bytes per name: choose a shorter name"
            )


def same_entry(output: Path, protected: Path) -> bool:
    """True when ``output`` names the same folder entry as ``protected``, through symlinks and ``..``.

    Writes replace folder entries (temporary file + rename), never file contents, so a hard link of an
    input may be replaced: the input keeps its bytes.
    """
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


def check_outputs(writes: Iterable[str | os.PathLike], reads: Iterable[str | os.PathLike | None]) -> None:
    """Refuse, before any work, any of ``writes`` that is one of ``reads`` (a model, a data file it
    references, an adapter file, a recipe) or that the file system cannot name."""
    protected: list[Path] = []
    for read in (Path(p) for p in reads if p is not None):
        protected.append(read)
        if read.is_dir():  # an adapter folder: every file in it is read (config, weights)
            with contextlib.suppress(OSError):
                protected.extend(read / name for name in os.listdir(read))
    seen: list[Path] = []
    for write in writes:
        output = Path(write)
        check_name_fits(output)
        for read in protected:
            if same_entry(output, read):
                raise OutputError(f"refusing to overwrite the input {read}; choose another output path")
        for earlier in seen:
            if same_entry(output, earlier):
                raise OutputError(f"{output} is asked for as two different outputs; give each its own path")
        seen.append(output)
