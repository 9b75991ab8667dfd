"""Tensors known from a safetensors header alone: shape and dtype, no data, no torch.

`inspect` reads adapters through these, so describing a LoRA costs a header read instead of a torch
import. They answer the questions the readers ask of a tensor (`shape`, `dim()`, `numel()`,
`reshape()`, `element_size()`), and `item()` reads a scalar's few bytes (kohya's `.alpha`); anything
else is an AttributeError, which keeps computing code from silently running on them.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from ..dtypes import itemsize

#: safetensors code -> struct format of one element, for `item()`. BF16 is the high half of an F32.
_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B",
           "BOOL": "<?"}


class HeaderTensor:
    def __init__(self, path: Path, offset: int, dtype: str, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return itemsize(self.dtype)

    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("F", "BF"))

    def reshape(self, *shape) -> HeaderTensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if known == 0 or shape.count(-1) > 1:
                raise ValueError(f"cannot view {list(self.shape)} as {list(shape)}")
            shape = tuple(self.numel() // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.numel():
            raise ValueError(f"cannot view {list(self.shape)} as {list(shape)}")
        return HeaderTensor(self.path, self.offset, self.dtype, shape)

    def item(self) -> float | int | bool:
        if self.numel() != 1:
            raise ValueError(f"item() of a tensor with {self.numel()} elements")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, self.element_size(), self.offset)
        finally:
            os.close(fd)
        if self.dtype == "BF16":
            return struct.unpack("<f", b"\0\0" + raw)[0]
        return struct.unpack(_STRUCT[self.dtype], raw)[0]

    def __repr__(self) -> str:
        return f"HeaderTensor({self.dtype}, {list(self.shape)})"
