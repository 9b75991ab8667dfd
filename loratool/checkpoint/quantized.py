"""Find the quantized encodings in a safetensors checkpoint from its headers (no torch).

The conventions (see ../shared/reference/lora-dialects.md §9):
- ComfyUI scaled FP8: a `scaled_fp8` marker tensor; float8 `X.weight` with a one-value `X.scale_weight`
  (and sometimes `X.scale_input`).
- ComfyUI per-layer: `X.comfy_quant` (uint8 JSON, `{"format": "float8_e4m3fn"}`) with `X.weight_scale`
  (and `X.input_scale`).
- HF block-scaled (DeepSeek-V3, Qwen3-FP8): float8 `X.weight` with `X.weight_scale_inv`, one value per
  `quantization_config.weight_block_size` block (128×128) of the last two dimensions; fused 3-D expert
  tensors (`experts.gate_up_proj` with `experts.gate_up_proj_scale_inv`) have one grid per expert.
- Per-tensor or per-channel `X.weight_scale` (ModelOpt, compressed-tensors).
- Plain float8: no scale at all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping

from .header import TensorInfo
from ..errors import InvalidCheckpointError, summarize
from ..quant import FP8, FP8_MAX, OPAQUE, Encoding, grid_shape

MARKER = "scaled_fp8"
FLOAT_SCALE_CODES = ("F32", "BF16", "F16", "F64")
#: comfy_quant formats this codec handles; the others (nvfp4, mxfp8, int8 ...) stay as stored tensors.
COMFY_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
MAX_COMFY_QUANT_BYTES = 4096
COMFY_QUANT = ".comfy_quant"
#: comfy_quant formats that pack several values per stored element, and how many.
PACKED_FORMATS = {"nvfp4": 2}
#: Without a config.json, the block every HF FP8 checkpoint uses; the grid check refuses any other.
DEFAULT_BLOCK = (128, 128)


def is_marker(name: str) -> bool:
    return name.rpartition(".")[2] == MARKER


def find_encodings(tensors: Mapping[str, TensorInfo], config: Callable[[], dict | None]
                   ) -> tuple[dict[str, TensorInfo], tuple[TensorInfo, ...]] | None:
    """(logical tensors, marker tensors) when the checkpoint holds float8 or comfy_quant tensors, else
    None. `config` gives config.json (for the block size), read only then.

    An encoded weight becomes one logical float32 tensor with `encoding` set; its scale and companion
    tensors leave the logical view. Every inconsistency is refused in one error."""
    comfy_entries = [name for name in tensors if name.endswith(COMFY_QUANT)]
    if not comfy_entries and not any(info.dtype in FP8_MAX for info in tensors.values()):
        return None
    block = _config_block(config())
    problems: list[str] = []
    markers = tuple(info for name, info in tensors.items() if is_marker(name))
    taken: set[str] = {info.name for info in markers}
    encodings: dict[str, Encoding] = {}
    formats = {entry: _comfy_format(tensors[entry], problems) for entry in comfy_entries
               if _stem(entry) + "weight" in tensors}
    for entry in comfy_entries:
        encoding = _opaque(entry, formats, tensors, problems)
        if encoding is not None:
            encodings[encoding.data.name] = encoding
            taken.update(part.name for part in encoding.parts)
    for name, info in tensors.items():
        if info.dtype not in FP8_MAX or name in taken:
            continue
        encoding = _encoding_of(name, info, tensors, formats, block, problems)
        if encoding is None:
            continue
        encodings[name] = encoding
        taken.update(part.name for part in encoding.parts)
    for name in tensors:
        if name not in taken and name.endswith((".scale_weight", "_scale_inv")):
            problems.append(f"{name} is a scale with no float8 weight beside it")
    if markers and not any(e.scale is not None for e in encodings.values()):
        problems.append(f"{markers[0].name!r} marks scaled FP8, but no tensor has a scale_weight")
    if problems:
        path = next(iter(tensors.values())).path
        raise InvalidCheckpointError(f"{path}: {summarize(problems)}")
    logical: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name in encodings:
            encoding = encodings[name]
            logical[name] = TensorInfo(name=name, dtype="F32", shape=_logical_shape(encoding), path=info.path,
                                       data_start=info.data_start, nbytes=encoding.stored_bytes, encoding=encoding)
        elif name not in taken:
            logical[name] = info
    return logical, markers


def _stem(comfy_quant_entry: str) -> str:
    """`X.comfy_quant` -> `X.`, the prefix of the layer's other tensors."""
    return comfy_quant_entry[: -len("comfy_quant")]


def _opaque(entry: str, formats: Mapping[str, str | None], tensors: Mapping[str, TensorInfo],
            problems: list[str]) -> Encoding | None:
    """A ComfyUI layer in a format loratool cannot requantize (nvfp4, mxfp8, int8...): its parts stay
    together as stored, copied by a merge, so that nothing mistakes its scales for weights."""
    stem = _stem(entry)
    weight = tensors.get(stem + "weight")
    if weight is None:
        problems.append(f"{entry} has no {stem}weight beside it")
        return None
    fmt = formats[entry]
    if fmt is None or fmt in COMFY_FORMATS:
        return None
    scale = tensors.get(stem + "weight_scale")
    riders = tuple(tensors[n] for n in (stem + "weight_scale_2", stem + "input_scale", entry) if n in tensors)
    return Encoding(OPAQUE, fmt, weight, scale, None, riders, "comfy-quant")


def _logical_shape(encoding: Encoding) -> tuple[int, ...]:
    """The weight's shape as the model sees it: nvfp4 packs two values in each stored byte."""
    shape = encoding.data.shape
    if encoding.scheme == OPAQUE and encoding.storage in PACKED_FORMATS and shape:
        return (*shape[:-1], shape[-1] * PACKED_FORMATS[encoding.storage])
    return shape


def _config_block(config: dict | None) -> tuple[int, int] | None:
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return None
    size = quant.get("weight_block_size")
    if size is None:
        return None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 0 < s <= 1 << 20 for s in size)):
        raise InvalidCheckpointError(f"config.json: quantization_config.weight_block_size must be two positive "
                                     f"integers, got {size!r}")
    return (size[0], size[1])


def _encoding_of(name: str, info: TensorInfo, tensors: Mapping[str, TensorInfo], formats: Mapping[str, str | None],
                 config_block: tuple[int, int] | None, problems: list[str]) -> Encoding | None:
    """`formats`: each `comfy_quant` entry's format, read once (None where it could not be read)."""
    stem = name[: -len("weight")] if name.endswith("weight") else name + "."
    extras = lambda *names: tuple(tensors[n] for n in (stem + x for x in names) if n in tensors)  # noqa: E731
    if stem + "scale_weight" in tensors:
        scale = tensors[stem + "scale_weight"]
        if _check_scale(scale, (), problems):
            return Encoding(FP8, info.dtype, info, scale, None, extras("scale_input"), "comfy-scaled")
        return None
    if stem + "comfy_quant" in tensors:
        fmt = formats.get(stem + "comfy_quant")  # absent: refused already, the entry has no weight
        if fmt is None or COMFY_FORMATS.get(fmt) != info.dtype:
            if fmt is not None and fmt in COMFY_FORMATS:
                problems.append(f"{stem}comfy_quant says {fmt}, but {name} is stored as {info.dtype}")
            return None
        scale = tensors.get(stem + "weight_scale")
        if scale is None:
            problems.append(f"{name} has a comfy_quant entry but no weight_scale")
            return None
        return _scaled(info, scale, None, extras("comfy_quant", "input_scale"), "comfy-quant", problems)
    if name + "_scale_inv" in tensors:
        block = config_block or DEFAULT_BLOCK
        return _scaled(info, tensors[name + "_scale_inv"], block, extras("input_scale"), "block-scaled", problems)
    if name + "_scale" in tensors:
        return _scaled(info, tensors[name + "_scale"], None, extras("input_scale"), "per-tensor", problems)
    if config_block is not None and len(info.shape) >= 2:
        problems.append(f"{name} is block-scaled FP8 by config.json, but {name}_scale_inv is missing")
        return None
    return Encoding(FP8, info.dtype, info, form="plain")


def _scaled(info: TensorInfo, scale: TensorInfo, block: tuple[int, int] | None, extras: tuple[TensorInfo, ...],
            form: str, problems: list[str]) -> Encoding | None:
    """A scale either holds one value, one per output row, or one per block of `block`."""
    shape = info.shape
    count = math.prod(scale.shape)
    if block is None and count != 1:
        block = (1, shape[-1]) if len(shape) >= 2 and count == math.prod(shape[:-1]) else None
        if block is None:
            problems.append(f"{scale.name} holds {count} values, which fits neither one scale nor one per row of "
                            f"{info.name} {list(shape)}")
            return None
    if block is not None:
        expected = grid_shape(shape, block)
        if math.prod(expected) != count or (len(scale.shape) == len(expected) and tuple(scale.shape) != expected):
            problems.append(f"{scale.name} has shape {list(scale.shape)}, but {info.name} {list(shape)} in "
                            f"{block[0]}×{block[1]} blocks needs {list(expected)}")
            return None
    if not _check_scale(scale, None, problems):
        return None
    return Encoding(FP8, info.dtype, info, scale, block, extras, form)


def _check_scale(scale: TensorInfo, shape: tuple[int, ...] | None, problems: list[str]) -> bool:
    if scale.dtype not in FLOAT_SCALE_CODES:
        problems.append(f"{scale.name} is stored as {scale.dtype}; a scale must be a float")
        return False
    if shape is not None and math.prod(scale.shape) != 1:
        problems.append(f"{scale.name} must hold one value, has shape {list(scale.shape)}")
        return False
    return True


def _comfy_format(info: TensorInfo, problems: list[str]) -> str | None:
    if info.dtype not in ("U8", "I8") or info.nbytes > MAX_COMFY_QUANT_BYTES:
        problems.append(f"{info.name} must be a small uint8 tensor holding JSON")
        return None
    fd = os.open(info.path, os.O_RDONLY)
    try:
        raw = os.pread(fd, info.nbytes, info.data_start)
    finally:
        os.close(fd)
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        problems.append(f"{info.name} does not hold JSON")
        return None
    fmt = entry.get("format") if isinstance(entry, dict) else None
    if not isinstance(fmt, str):
        problems.append(f"{info.name} has no \"format\" string")
        return None
    return fmt
