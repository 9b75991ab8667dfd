"""The one table of tensor dtypes: safetensors codes <-> torch dtypes, sizes, and CLI names."""

from __future__ import annotations

import torch

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

#: Names accepted by `--dtype`, and the names printed by `inspect`.
NAME_TO_TORCH: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
OUTPUT_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

#: Float dtypes whose values merge arithmetic may change. Anything else (ints, bools, fp8) is copied.
MERGEABLE_FLOATS = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


def itemsize(code: str) -> int:
    return SAFETENSORS_TO_TORCH[code].itemsize


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_output_dtype(name: str) -> torch.dtype | None:
    """`auto` keeps each tensor's own dtype (None); other names map to a torch float dtype."""
    return None if name == "auto" else NAME_TO_TORCH[name]
