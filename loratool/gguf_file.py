"""A GGUF file's header and metadata through the `gguf` package, which is an optional extra
(`loratool[gguf]`) imported only inside functions, so that `loratool --help` never loads it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidCheckpointError, UsageError

if TYPE_CHECKING:
    import torch


def import_gguf():
    """The `gguf` package, or a one-line error naming the extra that provides it."""
    try:
        import gguf
    except ImportError as e:
        raise UsageError("GGUF needs the gguf package: pip install 'loratool[gguf]'") from e
    return gguf


@dataclass
class GgufTensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]
    """In torch order (GGUF stores dimensions innermost first)."""
    numel: int
    nbytes: int


@dataclass
class GgufFile:
    """A GGUF file's metadata and tensor directory; `read()` dequantizes one tensor to float32."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]
    _reader: Any = field(repr=False)

    def read(self, name: str) -> torch.Tensor:
        import torch

        gguf = import_gguf()
        raw = next(t for t in self._reader.tensors if t.name == name)
        values = gguf.quants.dequantize(raw.data, raw.tensor_type)
        return torch.from_numpy(values.astype("float32").reshape(self.tensors[name].shape))


def read_gguf(path: str | os.PathLike) -> GgufFile:
    """Open a GGUF file: metadata values (arrays as a `[n × TYPE]` summary) and tensor headers."""
    gguf = import_gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a malformed file fails inside the reader in many ways; all mean "bad file"
        size = path.stat().st_size if path.is_file() else 0
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidCheckpointError(f"{path}: not a readable GGUF file ({size} bytes): truncated, corrupt, or using a "
                                     f"type the installed gguf package does not know (pip install -U gguf); "
                                     f"the gguf reader says: {said}") from e
    metadata = {name: _field_value(f, gguf) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        tensors[t.name] = GgufTensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                                         int(t.n_elements), int(t.n_bytes))
    return GgufFile(path, metadata, tensors, reader)


def _field_value(f, gguf) -> Any:
    """One metadata value, read from the field's raw parts (which every gguf release has)."""
    kinds = f.types
    if not kinds:
        return None
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        return f"[{len(f.data)} × {kinds[-1].name}]"
    value = f.parts[f.data[0]]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0]
