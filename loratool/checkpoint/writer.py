"""Streaming safetensors writer.

The safetensors library writes a file from a dict held whole in memory. A merge knows every output
tensor's name, dtype and shape before it computes any of them, so the header can be written first and
the data streamed after it, one tensor at a time, keeping peak memory at one tensor. Unchanged tensors
are copied file-to-file by the kernel (`copy_file_range`) without passing through Python.

Writeback starts while the file is written: every `WRITEBACK_CHUNK` bytes the kernel is asked to
start writing the range just finished (`sync_file_range`, asynchronous), and `finish()` waits with
`fdatasync` on the writer's own thread. The fsync that publishes the output (`checkpoint/output.py`)
then finds little or nothing left to write, and dirty pages never pile up in the page cache.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .header import TensorInfo

if TYPE_CHECKING:
    import torch

DEFAULT_METADATA = {"format": "pt"}
COPY_CHUNK = 64 << 20
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
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(self._fd, len(encoded).to_bytes(8, "little") + encoded)
        self._position = 8 + len(encoded)
        self._flushed = 0

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
            import torch

            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            _write_all(self._fd, data)
            self._advance(planned.nbytes)

    def copy_raw(self, name: str, source_fd: int, source: TensorInfo) -> None:
        """Copy a tensor's bytes unchanged from an open safetensors file."""
        planned = self._expect(name)
        if planned.nbytes != source.nbytes:
            raise RuntimeError(f"{name}: planned {planned.nbytes} bytes, source has {source.nbytes}")
        _copy_range(source_fd, self._fd, source.data_start, source.nbytes)
        self._advance(source.nbytes)

    def finish(self) -> None:
        """Check that every planned tensor arrived, wait for the data to reach the disk, then close."""
        if self._next != len(self.plan):
            raise RuntimeError(f"{self.path.name}: {len(self.plan) - self._next} planned tensors never written")
        os.fdatasync(self._fd)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
