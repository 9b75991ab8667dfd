"""`Checkpoint`: a read-only mapping from tensor name to header info, with positional reads of the data.

Its own module so that every kind of checkpoint (safetensors files here, GGUF files in `gguf_base.py`)
builds on it without importing the openers in `reader.py`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidCheckpointError
from ..jsonio import MODEL_CONFIG_RULES, read_json
from .header import TensorInfo
from .header_tensor import HeaderTensor

if TYPE_CHECKING:
    import torch

#: Files copied unchanged next to a merged model folder.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


@dataclass
class Checkpoint(Mapping[str, TensorInfo]):
    """A read-only mapping from tensor name to header info, with `read(name)` for the data."""

    path: Path
    is_folder: bool
    files: list[Path]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    index_path: Path | None = None
    pickled: dict[str, torch.Tensor] | None = None
    #: Every tensor as stored, when that differs from the logical view in `tensors` (quantized weights
    #: are one logical tensor there, their scales folded in); None when the two are the same.
    stored: dict[str, TensorInfo] | None = None
    #: File-level markers of a quantized encoding (ComfyUI's `scaled_fp8`), outside the logical view.
    markers: tuple[TensorInfo, ...] = ()
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    _fd_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def folder(self) -> Path | None:
        return self.path if self.is_folder else None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def config(self) -> dict | None:
        """The model's `config.json` when the checkpoint sits in a folder that has one."""
        folder = self.path if self.is_folder else self.path.parent
        config_path = folder / "config.json"
        if not config_path.is_file():
            return None
        return read_json(config_path, InvalidCheckpointError, rules=MODEL_CONFIG_RULES)

    def companion_files(self) -> list[Path]:
        if not self.is_folder:
            return []
        return [self.path / name for name in COMPANION_FILES if (self.path / name).is_file()]

    def load_all(self, header_only: bool = False) -> dict:
        """Every tensor: read into memory, or with `header_only` as `HeaderTensor`s (a pickle has no
        header, so it is read either way)."""
        fetch = self.header_tensor if header_only and self.pickled is None else self.read
        return {name: fetch(name) for name in self.tensors}

    def header_tensor(self, name: str) -> HeaderTensor:
        """Shape and dtype of a tensor without its data (and without torch); see header_tensor.py."""
        info = self.tensors[name]
        if self.pickled is not None:
            raise InvalidCheckpointError(f"{info.path}: a pickle file has no header to read tensors from")
        return HeaderTensor(info.path, info.data_start, info.dtype, info.shape)

    @property
    def physical(self) -> dict[str, TensorInfo]:
        """Every tensor as stored in the files."""
        return self.stored if self.stored is not None else self.tensors

    @property
    def encoded(self) -> bool:
        return self.stored is not None

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh CPU memory; a quantized one is dequantized to float32."""
        info = self.tensors[name]
        if self.pickled is not None:
            return self.pickled[name].clone()  # callers may update in place; the loaded state stays as read
        if info.encoding is not None:
            from ..quant.codec import decode

            return decode(info.encoding, self.read_stored)
        return self.read_stored(info)

    def read_stored(self, info: TensorInfo) -> torch.Tensor:
        """One physical tensor, as stored."""
        import torch

        tensor = torch.empty(info.shape, dtype=info.torch_dtype)
        if info.nbytes:
            _pread_into(self.fd(info.path), tensor.reshape(-1).view(torch.uint8).numpy(), info.data_start, info)
        return tensor

    def row_bytes(self, name: str) -> int:
        """Bytes per row (per index of the first dimension) of a tensor with at least one dimension; 0 for a
    quantized one, which is never read in rows."""
        info = self.tensors[name]
        if info.encoding is not None:
            return 0
        return info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0

    def read_rows(self, name: str, start: int, stop: int, buffer=None) -> torch.Tensor:
        """Read rows `[start, stop)` (along the first dimension) of a safetensors tensor.

        Into `buffer` (a 1-D uint8 tensor with room for them) when given, so that a merge can stream a
        tensor of any size through a few reused buffers: memory then does not grow with the tensor."""
        import torch

        info = self.tensors[name]
        if self.pickled is not None:
            return self.pickled[name][start:stop].clone()
        row = self.row_bytes(name)
        count = (stop - start) * row
        if buffer is None:
            buffer = torch.empty(count, dtype=torch.uint8)
        data = buffer[:count]
        if count:
            _pread_into(self.fd(info.path), data.numpy(), info.data_start + start * row, info)
        return data.view(info.torch_dtype).view(stop - start, *info.shape[1:])

    def fd(self, path: Path) -> int:
        """An open read-only descriptor for one of this checkpoint's files (closed by `close()`).

        Thread-safe: merge's reader thread and its main thread both ask for descriptors."""
        with self._fd_lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pread_into(fd: int, buffer, offset: int, info: TensorInfo) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InvalidCheckpointError(f"{info.path}: file ended while reading tensor {info.name!r} (truncated?)")
        done += got
