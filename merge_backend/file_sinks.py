"""Output files that appear whole or not at all, on the disk before they appear.

``AtomicWriter(target)`` writes under a temporary name beside ``target``, waits until the
bytes are on the disk (fdatasync), renames the file into place and syncs the folder; on any
error the temporary file is removed and ``target`` is untouched. ``replace=False`` (an output
written without ``--overwrite``) never replaces a ``target`` that appeared while it was being
written: the checks before the work cannot see a file another process writes meanwhile, so the
final move itself refuses to take an existing name (``move_into_place``).

A process killed while writing (SIGKILL, power loss) cannot remove its temporary file; the next
writer into the folder removes it (``partial_files``).

Large outputs (merged checkpoints: 2–7 GB) ask for ``direct=True``. Their bytes are then staged
in two page-aligned buffers, and a thread writes each full buffer straight to the device
(``O_DIRECT``) while the other one fills. Nothing goes through the page cache:
- the write costs what the disk costs, once. A buffered write is a copy into fresh page-cache
  memory, followed by a write-back that the final sync has to wait for anyway;
- the sources' cached pages are not evicted to make room for the output, so the next merge of
  the same files reads them from memory.
Where the file system refuses ``O_DIRECT`` (tmpfs before Linux 6.6; macOS and Windows have no such flag), the
file is written through the page cache and sent to the disk on a thread every 256 MB, so the
final sync has only the tail left to wait for.

Example:
    >>> with AtomicWriter(Path("out.bin"), direct=True) as sink:   # doctest: +SKIP
    ...     sink.write(b"header")
    ...     sink.write_tensor(torch.zeros(1024, dtype=torch.float16))
    ...     sink.patch(0, b"HEADER")  # applied once everything else is written
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .partial_files import partial_name, pause_point, remove_stale_partials

_datasync = getattr(os, "fdatasync", os.fsync)  # macOS and Windows have no fdatasync


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class BufferedSink:
    """A file written through the page cache; what is written goes to the disk on a thread
    every ``EVERY`` bytes (the kernel itself would start only once dirty pages pass a tenth of
    memory)."""

    EVERY = 256 << 20

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.flushed = 0
        self.patches: list[tuple[int, bytes]] = []
        self.wake = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._flush_loop, name="flusher", daemon=True)
        self.thread.start()

    def write(self, data) -> None:
        self.file.write(data)
        position = self.file.tell()
        if position - self.flushed >= self.EVERY and not self.wake.is_set():
            self.flushed = position
            self.wake.set()

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self.write(memoryview(_as_bytes(tensor).numpy()))

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite bytes already written, once the rest is written."""
        self.patches.append((offset, bytes(data)))

    def _flush_loop(self) -> None:
        while True:
            self.wake.wait()
            if self.done:
                return
            try:
                _datasync(self.file.fileno())  # releases the GIL; writing goes on
            except OSError:
                return  # the final sync reports any real error
            self.wake.clear()

    def close(self, ok: bool) -> None:
        """Finish: on ``ok``, apply the patches and wait until everything is on the disk."""
        self.done = True
        self.wake.set()
        self.thread.join()
        try:
            if ok:
                for offset, data in self.patches:
                    self.file.seek(offset)
                    self.file.write(data)
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()


class DirectSink:
    """A file written with ``O_DIRECT`` from two page-aligned staging buffers; a thread writes
    one to the device while the other fills. The last block is padded to the device's
    alignment and the file is cut back to its true length at the end."""

    BLOCK = 32 << 20  # bytes per staging buffer

    def __init__(self, path: Path):
        # Raises OSError where O_DIRECT is refused; the caller falls back to BufferedSink.
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            blksize = os.fstat(self.fd).st_blksize
            # st_blksize is the preferred I/O size; the device needs at most one page.
            self.align = max(mmap.PAGESIZE, blksize if blksize & (blksize - 1) == 0 and
                             blksize <= self.BLOCK else 0)
            self.buffers = [mmap.mmap(-1, self.BLOCK) for _ in range(2)]  # page-aligned
        except BaseException:
            os.close(self.fd)
            raise
        try:  # a file system may accept the flag and refuse the writes: try one block
            with memoryview(self.buffers[0]) as view:
                _pwrite_all(self.fd, view[:self.align], 0)
            os.ftruncate(self.fd, 0)
        except OSError:
            os.close(self.fd)
            raise
        self.staging = [torch.frombuffer(b, dtype=torch.uint8) for b in self.buffers]
        self.inflight: list[Future | None] = [None, None]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-writer")
        self.current = 0
        self.fill = 0  # bytes staged in the current buffer
        self.offset = 0  # file offset of the current buffer's first byte
        self.patches: list[tuple[int, bytes]] = []

    def write(self, data) -> None:
        self.write_tensor(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def write_tensor(self, tensor: torch.Tensor) -> None:
        src = _as_bytes(tensor)
        done, total = 0, src.numel()
        while done < total:
            n = min(total - done, self.BLOCK - self.fill)
            self.staging[self.current][self.fill:self.fill + n].copy_(src[done:done + n])
            self.fill += n
            done += n
            if self.fill == self.BLOCK:
                self._send(self.BLOCK)

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite bytes already written, once the rest is written."""
        self.patches.append((offset, bytes(data)))

    def _send(self, nbytes: int) -> None:
        """Hand the current buffer to the writer thread and take the other one."""
        index = self.current
        self.inflight[index] = self.pool.submit(self._write_buffer, index, nbytes, self.offset)
        self.offset += nbytes
        self.current ^= 1
        self.fill = 0
        waiting = self.inflight[self.current]
        if waiting is not None:  # the other buffer must be on the disk before it is reused
            self.inflight[self.current] = None
            waiting.result()

    def _write_buffer(self, index: int, nbytes: int, offset: int) -> None:
        with memoryview(self.buffers[index]) as view:
            _pwrite_all(self.fd, view[:nbytes], offset)

    def _apply_patch(self, offset: int, data: bytes) -> None:
        start = offset - offset % self.align
        end = -(-(offset + len(data)) // self.align) * self.align
        scratch = mmap.mmap(-1, end - start)  # O_DIRECT reads and writes need aligned memory
        with memoryview(scratch) as view:
            got = os.preadv(self.fd, [view], start)
            if got != end - start:
                raise OSError(errno.EIO, f"short read while patching byte {offset}")
            view[offset - start:offset - start + len(data)] = data
            _pwrite_all(self.fd, view, start)

    def close(self, ok: bool) -> None:
        """Finish: on ``ok``, write the padded tail, apply the patches, cut the file to its
        length and wait until everything is on the disk."""
        try:
            if ok:
                length = self.offset + self.fill
                padded = -(-self.fill // self.align) * self.align
                self.staging[self.current][self.fill:padded].zero_()
                if padded:
                    self._write_buffer(self.current, padded, self.offset)
            for index, future in enumerate(self.inflight):
                self.inflight[index] = None
                if future is not None and ok:
                    future.result()
            if ok:
                for offset, data in self.patches:
                    self._apply_patch(offset, data)
                os.ftruncate(self.fd, length)
                _datasync(self.fd)
        finally:
            self.pool.shutdown(wait=True)
            os.close(self.fd)
            # The buffers are unmapped once unreferenced; closing them here would fail while
            # a writer thread's error (and the views its traceback holds) is being raised.
            self.staging = self.buffers = []


def open_sink(path: Path, direct: bool) -> BufferedSink | DirectSink:
    """A DirectSink where asked for and the file system allows it, else a BufferedSink."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return DirectSink(path)
        except OSError:  # EINVAL: older tmpfs and others refuse O_DIRECT
            Path(path).unlink(missing_ok=True)
    return BufferedSink(path)


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where folders can be opened: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def move_into_place(tmp: Path, target: Path, replace: bool = True) -> None:
    """Rename the finished file or folder ``tmp`` to ``target``. Without ``replace``, a
    ``target`` that exists (a file, folder or link another process made since the output was
    checked) is left as it is and FileExistsError names it; ``tmp`` is then the caller's to
    remove. Both moves are atomic: a file is hard-linked to the new name (which fails on an
    existing one) and its temporary name removed; a folder takes the name by making it (which
    fails likewise), then renames onto that empty folder of its own. Where a file system has no
    hard links, a file is moved after a check, which a writer of the same instant can outrun."""
    if replace:
        os.replace(tmp, target)
        return
    appeared = FileExistsError(errno.EEXIST, "appeared while this output was being written; "
                               "pass --overwrite to replace it", str(target))
    if tmp.is_dir():
        try:
            os.mkdir(target)
        except FileExistsError:
            raise appeared from None
        try:
            os.rename(tmp, target)  # onto the empty folder made above: nothing else is replaced
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(target)  # still ours if empty; left if another writer filled it
            raise
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise appeared from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        if os.path.lexists(target):  # FAT, some network file systems: no hard links
            raise appeared from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


class AtomicWriter:
    """Write a file under a temporary name and move it into place only when it is complete
    and on the disk (see the module docstring).

    Used as a context manager that yields the sink: on any exception the temporary file is
    removed and the target is untouched. Entering it first removes stale partial files that
    killed writers left in the folder. ``replace``: see ``move_into_place``.
    """

    def __init__(self, target: Path, direct: bool = False, replace: bool = True):
        self.target = Path(target)
        self.direct = direct
        self.replace = replace
        self.tmp = self.target.with_name(partial_name(self.target.name))
        self.sink: BufferedSink | DirectSink | None = None

    def __enter__(self) -> BufferedSink | DirectSink:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.target.parent)
        self.sink = open_sink(self.tmp, self.direct)
        return self.sink

    def __exit__(self, exc_type, exc, tb) -> None:
        ok = exc_type is None
        try:
            self.sink.close(ok)
            if ok:
                pause_point("before-rename")
                move_into_place(self.tmp, self.target, self.replace)
        except BaseException as error:
            self.tmp.unlink(missing_ok=True)
            named = _naming(error, self.target)
            if named is error:
                raise
            raise named from error
        if ok:
            pause_point("after-rename")
            sync_folder(self.target.parent)
            return
        self.tmp.unlink(missing_ok=True)
        named = _naming(exc, self.target)
        if named is not exc:
            raise named from exc


def _naming(error: BaseException, target: Path) -> BaseException:
    """A disk error (ENOSPC, EFBIG, EIO: they come without a file name) naming the output."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        return OSError(error.errno, f"writing {target}: {error.strerror}")
    return error
