"""The one table of tensor dtypes: safetensors codes <-> torch dtypes, sizes, and CLI names.

The byte sizes and names are plain data, so header reading and the CLI need no torch. The tables
holding torch dtypes (`SAFETENSORS_TO_TORCH`, `TORCH_TO_SAFETENSORS`, `NAME_TO_TORCH`,
`MERGEABLE_FLOATS`) are built on first access, which is the first moment torch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: safetensors dtype code -> (torch attribute name, bytes per element).
_CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
#: The safetensors dtype codes loratool reads and writes.
SAFETENSORS_CODES = frozenset(_CODES)
#: Safetensors codes of the floats merge arithmetic may change; anything else (ints, bools, fp8) is copied.
MERGEABLE_CODES = frozenset({"F64", "F32", "F16", "BF16"})
#: Names accepted by `--dtype`, and the names printed by `inspect`.
FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")
OUTPUT_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: `merge --dtype` also writes quantized encodings: ComfyUI's scaled FP8, or a GGUF type for a GGUF base.
FP8_OUTPUT = "float8_e4m3fn"
GGUF_OUTPUTS = {"q8_0": "Q8_0"}
MERGE_DTYPE_CHOICES = OUTPUT_DTYPE_CHOICES + (FP8_OUTPUT, *GGUF_OUTPUTS)


def itemsize(code: str) -> int:
    return _CODES[code][1]


def code_of(tensor) -> str:
    """A tensor's safetensors code: a torch tensor's, or a `HeaderTensor`'s own (already a code)."""
    if isinstance(tensor.dtype, str):
        return tensor.dtype
    return __getattr__("TORCH_TO_SAFETENSORS")[tensor.dtype]


def _tables() -> dict[str, object]:
    import torch

    to_torch = {code: getattr(torch, name) for code, (name, _) in _CODES.items()}
    return {
        "SAFETENSORS_TO_TORCH": to_torch,
        "TORCH_TO_SAFETENSORS": {v: k for k, v in to_torch.items()},
        "NAME_TO_TORCH": {name: getattr(torch, name) for name in FLOAT_NAMES},
        "MERGEABLE_FLOATS": frozenset(to_torch[code] for code in MERGEABLE_CODES),
    }


def __getattr__(name: str):
    """Build the torch-valued tables on first access (PEP 562), then keep them as plain globals."""
    if name in ("SAFETENSORS_TO_TORCH", "TORCH_TO_SAFETENSORS", "NAME_TO_TORCH", "MERGEABLE_FLOATS"):
        tables = _tables()
        globals().update(tables)
        return tables[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_output_dtype(name: str) -> torch.dtype | None:
    """`auto` keeps each tensor's own dtype (None); other names map to a torch float dtype."""
    if name == "auto":
        return None
    if name not in FLOAT_NAMES:
        raise KeyError(name)
    import torch

    return getattr(torch, name)
