"""Streaming safetensors writer.

The safetensors library writes a file from a dict held whole in memory. A merge knows every output
tensor's name, dtype and shape before it computes any of them, so the header can be written first and
the data streamed after it, one tensor at a time, keeping peak memory at one tensor. Unchanged tensors
are copied file-to-file by the kernel (`copy_file_range`) without passing through Python.

Files of `DIRECT_MIN_BYTES` or more are written with O_DIRECT: the bytes are staged in one
page-aligned buffer and sent to the disk in large aligned blocks, bypassing the page cache. On the
2-core VM this was measured on, buffered `write()` of new data ran at a third of the speed of a
kernel file-to-file copy (page-cache allocation and dirty throttling), while O_DIRECT writes were
faster than either and leave nothing for the final fsync to flush. Untouched tensors are then read
straight into the staging buffer. Where the filesystem refuses O_DIRECT (tmpfs, some network
filesystems), or with LORATOOL_NO_DIRECT_IO=1, files are written through the page cache instead:
untouched tensors with `copy_file_range`, and writeback started every `WRITEBACK_CHUNK` bytes
(`sync_file_range`, asynchronous) so that `finish()`'s `fdatasync` finds little left to write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import env
from .header import TensorInfo

if TYPE_CHECKING:
    import torch

DEFAULT_METADATA = {"format": "pt"}
COPY_CHUNK = 64 << 20
#: Files at least this large are written with O_DIRECT through a staging buffer of STAGING_BYTES.
DIRECT_MIN_BYTES = 64 << 20
STAGING_BYTES = 16 << 20
DIRECT_ALIGN = 4096
#: Bytes after which the writer asks the kernel to start writing back what it has written so far.
WRITEBACK_CHUNK = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: list = []


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing `[offset, offset + count)` of `fd` to disk, without waiting.

    Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)` through ctypes (which releases the GIL); a no-op
    where it is missing. It makes no durability promise on its own: `fsync` still does that."""
    if not _sync_file_range:
        try:
            import ctypes

            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range.append(function)
        except (OSError, AttributeError):
            _sync_file_range.append(None)
    function = _sync_file_range[0]
    if function is not None and count > 0:
        function(fd, offset, count, _SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    try:
        while count:
            copied = os.copy_file_range(src_fd, dst_fd, count, offset)
            if copied == 0:
                raise OSError("source ended early")
            offset += copied
            count -= copied
    except OSError:
        # Filesystems or kernels without copy_file_range: fall back to chunked reads.
        while count:
            chunk = os.pread(src_fd, min(count, COPY_CHUNK), offset)
            if not chunk:
                raise
            _write_all(dst_fd, chunk)
            offset += len(chunk)
            count -= len(chunk)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        try:
            written = os.pwritev(fd, [view], offset)
        except OSError as e:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if e.errno != errno.EINVAL or not flags & getattr(os, "O_DIRECT", 0):
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)  # the filesystem took the flag but not the writes
            continue
        view, offset = view[written:], offset + written


class _DirectSink:
    """Sequential output through one page-aligned staging buffer, written in aligned blocks at aligned
    offsets (as O_DIRECT requires); the last block is padded, and `finish` truncates the padding."""

    def __init__(self, fd: int, size: int | None = None):
        import torch

        size = size or STAGING_BYTES
        self._fd = fd
        self._map = mmap.mmap(-1, size)
        self._view = memoryview(self._map)
        self._tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self._size, self._fill, self._base = size, 0, 0

    def _flush(self, final: bool = False) -> None:
        count = self._fill if final else self._fill - self._fill % DIRECT_ALIGN
        padded = -(-count // DIRECT_ALIGN) * DIRECT_ALIGN
        if padded > count:
            self._view[count:padded] = bytes(padded - count)
        if padded:
            _pwrite_all(self._fd, self._view[:padded], self._base)
        rest = self._fill - count
        if rest:
            self._view[:rest] = self._view[count:self._fill]
        self._base, self._fill = self._base + count, rest

    def _room(self) -> int:
        if self._fill == self._size:
            self._flush()
        return self._size - self._fill

    def write_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), self._room())
            self._view[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]

    def write_tensor(self, data) -> None:
        """Copy a flat uint8 CPU tensor in (torch's copy releases the GIL)."""
        done = 0
        while done < data.numel():
            n = min(data.numel() - done, self._room())
            self._tensor[self._fill:self._fill + n].copy_(data[done:done + n])
            self._fill += n
            done += n

    def read_from(self, source_fd: int, source: TensorInfo) -> None:
        """Read a tensor's bytes from an open file straight into the staging buffer."""
        from .base import _pread_into

        done = 0
        while done < source.nbytes:
            n = min(source.nbytes - done, self._room())
            _pread_into(source_fd, self._view[self._fill:self._fill + n], source.data_start + done, source)
            self._fill += n
            done += n

    def finish(self) -> None:
        self._flush(final=True)
        os.ftruncate(self._fd, self._base)

    def close(self) -> None:
        del self._tensor
        self._view.release()
        self._map.close()


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are fixed up front; data must arrive in plan order."""

    def __init__(self, path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None):
        from ..dtypes import TORCH_TO_SAFETENSORS

        self.path = path
        self.plan = plan
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata or DEFAULT_METADATA)}
        offset = 0
        for item in plan:
            header[item.name] = {
                "dtype": TORCH_TO_SAFETENSORS[item.dtype],
                "shape": list(item.shape),
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._fd = -1
        self._sink: _DirectSink | None = None
        self._fd = _open_output(path, direct=offset >= DIRECT_MIN_BYTES and env.direct_io_enabled())
        if fcntl.fcntl(self._fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            self._sink = _DirectSink(self._fd)
        self._emit(len(encoded).to_bytes(8, "little") + encoded)
        self._position = 8 + len(encoded)
        self._flushed = 0

    def _emit(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.write_bytes(data)
        else:
            _write_all(self._fd, data)

    def _advance(self, count: int) -> None:
        self._position += count
        if self._position - self._flushed >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._flushed, self._position - self._flushed)
            self._flushed = self._position

    def _expect(self, name: str) -> PlannedTensor:
        if self._next >= len(self.plan) or self.plan[self._next].name != name:
            expected = self.plan[self._next].name if self._next < len(self.plan) else "nothing"
            raise RuntimeError(f"writer for {self.path.name} expected {expected!r}, got {name!r}")
        self._next += 1
        return self.plan[self._next - 1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self._expect(name)
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"{name}: planned {planned.dtype}{list(planned.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        if planned.nbytes:
            self._write_data(tensor)

    def begin(self, name: str) -> None:
        """Start a tensor whose data arrives in row chunks through `append`, then `end`."""
        self._streaming = self._expect(name)
        self._remaining = self._streaming.nbytes

    def append(self, rows: torch.Tensor) -> None:
        planned = self._streaming
        if rows.dtype != planned.dtype or tuple(rows.shape[1:]) != planned.shape[1:]:
            raise RuntimeError(f"{planned.name}: planned {planned.dtype} rows of {list(planned.shape[1:])}, got "
                               f"{rows.dtype}{list(rows.shape)}")
        nbytes = rows.numel() * rows.element_size()
        if nbytes > self._remaining:
            raise RuntimeError(f"{planned.name}: more rows than planned")
        self._remaining -= nbytes
        if nbytes:
            self._write_data(rows)

    def end(self) -> None:
        if self._remaining:
            raise RuntimeError(f"{self._streaming.name}: {self._remaining} bytes of rows never arrived")
        self._streaming = None

    def _write_data(self, tensor: torch.Tensor) -> None:
        import torch

        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if self._sink is not None:
            self._sink.write_tensor(data)
        else:
            _write_all(self._fd, data.numpy())
            self._advance(data.numel())

    def copy_raw(self, name: str, source_fd: int, source: TensorInfo) -> None:
        """Copy a tensor's bytes unchanged from an open safetensors file."""
        planned = self._expect(name)
        if planned.nbytes != source.nbytes:
            raise RuntimeError(f"{name}: planned {planned.nbytes} bytes, source has {source.nbytes}")
        if self._sink is not None:
            self._sink.read_from(source_fd, source)
        else:
            _copy_range(source_fd, self._fd, source.data_start, source.nbytes)
            self._advance(source.nbytes)

    def finish(self) -> None:
        """Check that every planned tensor arrived, wait for the data to reach the disk, then close."""
        if self._next != len(self.plan):
            raise RuntimeError(f"{self.path.name}: {len(self.plan) - self._next} planned tensors never written")
        if self._sink is not None:
            self._sink.finish()
        os.fdatasync(self._fd)
        self.close()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_output(path: Path, direct: bool) -> int:
    """Open for writing, with O_DIRECT when asked and the filesystem accepts it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644)


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def shard_names(count: int, stem: str = "model") -> list[str]:
    """Hugging Face's naming: `model.safetensors`, or `model-00001-of-00003.safetensors`."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(path: Path, layout: dict[str, list[PlannedTensor]]) -> None:
    """`model.safetensors.index.json` as transformers writes it."""
    weight_map = {item.name: file for file, items in layout.items() for item in items}
    total = sum(item.nbytes for items in layout.values() for item in items)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by dtype and shape now and read only when it is written."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | LazyTensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write one file, loading each `LazyTensor` only when its turn comes, so one is in memory at a time."""
    plan = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = SafetensorsWriter(path, plan, metadata)
    try:
        for name, tensor in tensors.items():
            loaded = tensor.load().to(tensor.dtype) if isinstance(tensor, LazyTensor) else tensor
            writer.write(name, loaded)
        writer.finish()
    finally:
        writer.close()
