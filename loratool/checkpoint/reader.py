"""Open checkpoints lazily: one `.safetensors` file, a sharded folder with an index, a folder of files,
a GGUF model (`gguf_base.py`), or (opted into) pickles.

Headers of all files are validated when a checkpoint is opened; tensor data is read later, one tensor
at a time, with positional reads straight into the tensor's own buffer (`base.Checkpoint`). Positional
reads rather than a memory map keep the resident set at one tensor: mapped pages of a multi-GB shard
would otherwise count against the process until the map is closed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidCheckpointError, LoratoolError, summarize
from ..jsonio import read_json
from .base import COMPANION_FILES, Checkpoint
from .header import TensorInfo, read_header
from .pickled import PICKLE_SUFFIXES, load_pickle_state_dict, refuse_pickle

if TYPE_CHECKING:
    import torch

__all__ = ["COMPANION_FILES", "Checkpoint", "open_checkpoint"]

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".index.json"
GGUF_SUFFIX = ".gguf"


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

    found = find_encodings(checkpoint.tensors, checkpoint.config)
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
