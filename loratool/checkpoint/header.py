"""Parse and fully validate a safetensors header before any tensor data is touched.

The format: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer. Every entry
maps a tensor name to dtype, shape and `[begin, end)` offsets into the data buffer.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import SAFETENSORS_CODES, itemsize
from ..errors import InvalidCheckpointError, PickleRefusedError, summarize
from ..jsonio import HEADER, collector_paused, parse_json

if TYPE_CHECKING:
    from ..quant import Encoding

#: Same ceiling as the safetensors library: anything larger is not a real header.
MAX_HEADER_BYTES = HEADER.max_bytes
#: No tensor's dimensions may span 2^63 bytes, counting a 0 dimension as 1: torch computes strides
#: that way, so `[0, 2**63]` holds no data yet cannot be allocated (nor indexed) as a tensor.
MAX_EXTENT_BYTES = (1 << 63) - 1
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_MARK = 0x80


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; `data_start` is an absolute file offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    data_start: int
    nbytes: int
    #: Set on a logical tensor stored quantized (`loratool.quant`): `nbytes` then counts all its parts,
    #: and reading it dequantizes to `dtype` (float32).
    encoding: Encoding | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self):
        from ..dtypes import SAFETENSORS_TO_TORCH

        return SAFETENSORS_TO_TORCH[self.dtype]


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _looks_pickled(prefix: bytes) -> bool:
    """Only consulted once the bytes have failed as a safetensors length: a valid length may start 0x80."""
    return prefix.startswith(ZIP_MAGIC) or (len(prefix) > 0 and prefix[0] == PICKLE_PROTOCOL_MARK)


#: The last headers parsed, by file and header bytes: a command often opens one file twice (format
#: detection, then the read), and parsing and validating a 400k-tensor header costs seconds, while
#: reading its bytes again costs milliseconds. Keyed by the bytes themselves, so a file rewritten in
#: place within one timestamp tick is never mistaken for the old one.
_RECENT: dict[tuple[str, int], tuple[bytes, Header]] = {}
_RECENT_SIZE = 4


def read_header(path: Path) -> Header:
    """Read and validate the header of `path`, reporting every problem found in one error. The same
    file with the same size and header bytes as one read lately gives that `Header` again."""
    file_size = path.stat().st_size
    raw = _raw_header(path, file_size)
    key = (str(path), file_size)
    cached = _RECENT.get(key)
    if cached is not None and cached[0] == raw:
        return cached[1]
    header = _parse_header(path, raw, file_size)
    _RECENT.pop(key, None)
    while len(_RECENT) >= _RECENT_SIZE:
        _RECENT.pop(next(iter(_RECENT)))
    _RECENT[key] = (raw, header)
    return header


def _raw_header(path: Path, file_size: int) -> bytes:
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidCheckpointError(f"{path}: not a safetensors file ({file_size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
            if _looks_pickled(prefix):
                raise PickleRefusedError(
                    f"{path}: this is a PyTorch pickle checkpoint named like safetensors; convert it to "
                    "safetensors, or rename it to .bin and pass --allow-pickle"
                )
            raise InvalidCheckpointError(
                f"{path}: not a valid safetensors file (header length {header_len} does not fit a "
                f"{file_size}-byte file); the file may be truncated or of another format"
            )
        return f.read(header_len)


def _parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    # bounded before it is parsed; duplicated keys, NaN and Infinity refused (see jsonio.py)
    parsed = parse_json(raw, f"{path}: invalid safetensors header", InvalidCheckpointError, HEADER, expect=None)
    if not isinstance(parsed, dict):
        raise InvalidCheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + len(raw)
    with collector_paused():
        tensors, metadata = _validate_entries(path, parsed, data_size=file_size - data_start, data_start=data_start)
    return Header(path=path, tensors=tensors, metadata=metadata, data_start=data_start)


def _validate_entries(
    path: Path, parsed: dict, data_size: int, data_start: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    problems: list[str] = []
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        problems.append("__metadata__ must map strings to strings")
        metadata = {}
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    sizes = {code: itemsize(code) for code in SAFETENSORS_CODES}
    for name, entry in parsed.items():
        info = _valid_entry(path, name, entry, data_size, data_start, sizes)
        if info is None:  # something is wrong: the slow path says what
            info = _validate_entry(path, name, entry, data_size, data_start, problems)
        if info is not None:
            tensors[name] = info
            spans.append((info.data_start, info.data_start + info.nbytes, name))
    spans.sort()
    for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            problems.append(f"tensors {prev_name!r} and {name!r} overlap")
    if problems:
        raise InvalidCheckpointError(f"{path}: invalid safetensors header: {summarize(problems)}")
    return tensors, metadata


def _extent_too_large(shape: list[int], element_bytes: int) -> bool:
    """Whether the dimensions (a 0 counted as 1) span more than `MAX_EXTENT_BYTES`; stops as soon as
    they do, so a long list of huge dimensions costs no big-number products."""
    if len(shape) <= 8 and 0 not in shape:  # the common case, in C: a few dims, no zero
        return math.prod(shape) * element_bytes > MAX_EXTENT_BYTES
    extent = element_bytes
    for d in shape:
        extent *= max(d, 1)
        if extent > MAX_EXTENT_BYTES:
            return True
    return False


def _valid_entry(path: Path, name: str, entry: object, data_size: int, data_start: int,
                 sizes: dict[str, int]) -> TensorInfo | None:
    """The entry's TensorInfo when every rule of `_validate_entry` holds, else None; the same checks in
    C-level calls, because a header may list 400k tensors."""
    if type(entry) is not dict:
        return None
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    size = sizes.get(entry.get("dtype"))
    if size is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    begin, end = offsets
    if (type(begin) is not int or type(end) is not int or not set(map(type, shape)) <= {int}
            or (shape and min(shape) <= 0) or len(shape) > 8):
        return None
    nbytes = math.prod(shape) * size
    if nbytes > MAX_EXTENT_BYTES or not 0 <= begin <= end or end - begin != nbytes or end > data_size:
        return None
    return TensorInfo(name=name, dtype=entry["dtype"], shape=tuple(shape), path=path, data_start=data_start + begin,
                      nbytes=nbytes)


def _validate_entry(
    path: Path, name: str, entry: object, data_size: int, data_start: int, problems: list[str]
) -> TensorInfo | None:
    if not isinstance(entry, dict):
        problems.append(f"entry {name!r} is not an object")
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_CODES:
        problems.append(f"tensor {name!r} has unsupported dtype {dtype!r}")
        return None
    # `type(x) is int` refuses bools and floats in one test, which matters at 400k entries
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        problems.append(f"tensor {name!r} has an invalid shape {shape!r}")
        return None
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        problems.append(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        return None
    begin, end = offsets
    element_bytes = itemsize(dtype)
    if _extent_too_large(shape, element_bytes):
        problems.append(f"tensor {name!r} has an absurd shape {shape} (its dimensions span 2^63 bytes or more)")
        return None
    expected = math.prod(shape) * element_bytes
    if not 0 <= begin <= end:
        problems.append(f"tensor {name!r} has data_offsets {offsets} out of order")
        return None
    if end - begin != expected:
        problems.append(
            f"tensor {name!r} is {dtype}{shape} ({expected} bytes) but its data_offsets span {end - begin} bytes"
        )
        return None
    if end > data_size:
        problems.append(
            f"tensor {name!r} ends at byte {end} but the data section holds {data_size} bytes (truncated file?)"
        )
        return None
    return TensorInfo(
        name=name, dtype=dtype, shape=tuple(shape), path=path, data_start=data_start + begin, nbytes=expected
    )
