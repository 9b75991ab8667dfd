"""Lazy checkpoints: one `.safetensors` file, a sharded folder with an index, or a folder of files.

Headers of all files are validated when a checkpoint is opened; tensor data is read later, one tensor
at a time, with positional reads straight into the tensor's own buffer. Positional reads rather than a
memory map keep the resident set at one tensor: mapped pages of a multi-GB shard would otherwise
count against the process until the map is closed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidCheckpointError, LoratoolError, summarize
from ..jsonio import MODEL_CONFIG_RULES, read_json
from .header import TensorInfo, read_header
from .header_tensor import HeaderTensor
from .pickled import PICKLE_SUFFIXES, load_pickle_state_dict, refuse_pickle

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".index.json"
GGUF_SUFFIX = ".gguf"
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


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False, quantized: bool = True) -> Checkpoint:
    """Open a checkpoint file, index file or folder, validating every header before returning.

    Quantized weights appear as one logical tensor each, read dequantized (`loratool.quant`); adapter
    readers pass `quantized=False` to see the tensors as stored, since an adapter's factors are never
    an encoding to undo (a float8 factor is refused by the module check)."""
    checkpoint = _open(Path(path), allow_pickle)
    if quantized and checkpoint.pickled is None and checkpoint.stored is None:
        _fold_encodings(checkpoint)
    return checkpoint


def _open(path: Path, allow_pickle: bool) -> Checkpoint:
    if not path.exists():
        raise InvalidCheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path, allow_pickle)
    if path.name.endswith(INDEX_SUFFIX):
        return _open_index(path, allow_pickle)
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle_files(path, [path], allow_pickle, is_folder=False)
    if path.suffix == GGUF_SUFFIX:
        from .gguf_base import open_gguf_checkpoint

        return open_gguf_checkpoint(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise InvalidCheckpointError(
            f"{path}: unknown checkpoint type; expected a .safetensors or .gguf file, an .index.json or a model folder"
        )
    header = read_header(path)
    return Checkpoint(
        path=path, is_folder=False, files=[path], tensors=header.tensors, metadata={path.name: header.metadata}
    )


def _fold_encodings(checkpoint: Checkpoint) -> None:
    """Fold quantized weights and their scales into logical tensors (`quantized.py`)."""
    from .quantized import find_encodings

    found = find_encodings(checkpoint.tensors, checkpoint.config())
    if found is not None:
        checkpoint.stored = checkpoint.tensors
        checkpoint.tensors, checkpoint.markers = found


def _open_folder(folder: Path, allow_pickle: bool) -> Checkpoint:
    indexes = sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise InvalidCheckpointError(
            f"{folder}: several index files ({', '.join(p.name for p in indexes)}); pass the one to use"
        )
    if indexes:
        return _open_index(indexes[0], allow_pickle)
    files = sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}"))
    if files:
        return _from_files(folder, files, is_folder=True)
    pickle_indexes = sorted(p for p in folder.glob(f"*{INDEX_SUFFIX}") if Path(p.stem).suffix in PICKLE_SUFFIXES)
    if pickle_indexes:
        return _open_index(pickle_indexes[0], allow_pickle)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        return _open_pickle_files(folder, pickles, allow_pickle, is_folder=True)
    raise InvalidCheckpointError(f"{folder}: no .safetensors files or index found in this folder")


def _from_files(root: Path, files: list[Path], is_folder: bool, index_path: Path | None = None) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str]] = {}
    clashes: list[str] = []
    for file in files:
        header = read_header(file)
        metadata[file.name] = header.metadata
        for name, info in header.tensors.items():
            if name in tensors:
                clashes.append(f"{name!r} in both {tensors[name].path.name} and {file.name}")
            tensors[name] = info
    if clashes:
        raise InvalidCheckpointError(f"{root}: tensors stored twice: {summarize(clashes)}")
    return Checkpoint(path=root, is_folder=is_folder, files=files, tensors=tensors, metadata=metadata,
                      index_path=index_path)


def _load_index(index_path: Path) -> dict[str, str]:
    index = read_json(index_path, InvalidCheckpointError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InvalidCheckpointError(f"{index_path}: no valid 'weight_map' (tensor name -> shard file)")
    unsafe = sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")})
    if unsafe:
        raise InvalidCheckpointError(
            f"{index_path}: shard names must be plain file names in the same folder, got {summarize(unsafe)}"
        )
    return weight_map


def _open_index(index_path: Path, allow_pickle: bool) -> Checkpoint:
    folder = index_path.parent
    weight_map = _load_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    missing = [n for n in shard_names if not (folder / n).is_file()]
    if missing:
        raise InvalidCheckpointError(f"{index_path}: shard files missing: {summarize(missing)}")
    shards = [folder / n for n in shard_names]
    if any(p.suffix in PICKLE_SUFFIXES for p in shards):
        checkpoint = _open_pickle_files(folder, shards, allow_pickle, is_folder=True)
    else:
        checkpoint = _from_files(folder, shards, is_folder=True, index_path=index_path)
    checkpoint.index_path = index_path
    problems = [
        f"{name!r} listed in {file} but stored in {checkpoint.tensors[name].path.name}"
        for name, file in weight_map.items()
        if name in checkpoint.tensors and checkpoint.tensors[name].path.name != file
    ]
    problems += [f"{name!r} listed but not stored in {file}" for name, file in weight_map.items()
                 if name not in checkpoint.tensors]
    problems += [f"{name!r} stored in {info.path.name} but not listed" for name, info in checkpoint.tensors.items()
                 if name not in weight_map]
    if problems:
        raise InvalidCheckpointError(f"{index_path}: index does not match the shards: {summarize(problems)}")
    return checkpoint


def _open_pickle_files(root: Path, files: list[Path], allow_pickle: bool, is_folder: bool) -> Checkpoint:
    if not allow_pickle:
        raise refuse_pickle(files[0])
    from ..dtypes import TORCH_TO_SAFETENSORS
    loaded: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, tensor in load_pickle_state_dict(file).items():
            if tensor.dtype not in TORCH_TO_SAFETENSORS:
                raise LoratoolError(f"{file}: tensor {name!r} has unsupported dtype {tensor.dtype}")
            tensor = tensor.contiguous()
            loaded[name] = tensor
            tensors[name] = TensorInfo(
                name=name, dtype=TORCH_TO_SAFETENSORS[tensor.dtype], shape=tuple(tensor.shape), path=file,
                data_start=-1, nbytes=tensor.numel() * tensor.element_size(),
            )
    return Checkpoint(path=root, is_folder=is_folder, files=files, tensors=tensors, pickled=loaded)
