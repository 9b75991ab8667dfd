"""Merge into a GGUF base: rewrite the file with the changed tensors requantized, the rest copied.

Every metadata value is copied with its GGUF type, tensors keep the base's order, and an untouched
tensor's bytes go from the base to the output unchanged. A changed tensor is dequantized, merged by
the caller's `merged` callback (in HF row order for llama-arch q/k), put back in the file's row order
and shape, and quantized into the base tensor's own type, or into `out_type`. Types the `gguf`
package cannot write (the K- and I-quants) become Q8_0, and a note says so (`quant/gguf_codec.py`).

GGUF puts the tensor directory before the data, so the output type and size of every tensor is fixed
first (it depends only on the type and the row length), then the data is streamed one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, summarize
from ..quant.gguf_codec import FALLBACK
from ..quant.report import RoundingFigure, RoundingTally

if TYPE_CHECKING:
    import torch

    from ..checkpoint.gguf_base import GgufCheckpoint

#: `out_type`s: a dequantized output or Q8_0 (`merge --dtype`).
OUT_TYPES = ("Q8_0", "F16", "BF16", "F32")

MergedFn = Callable[["torch.Tensor", str, list], "torch.Tensor"]


def write_gguf_merge(checkpoint: GgufCheckpoint, ops_by_name: Mapping[str, list], output_path: str | os.PathLike,
                     merged: MergedFn, out_type: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[RoundingFigure], list[str]]:
    """Write the merged model to `output_path`. `ops_by_name` maps logical tensor names to the ops that
    change them (passed through to `merged(base_float32, name, ops)`, which returns the merged float32
    tensor and must not update `base_float32` in place: it is also the rounding tally's base). With `out_type` every tensor of two or more dimensions whose rows that type can hold is
    converted to it; 1-D tensors (norms) keep their type unless changed. Returns one rounding figure per
    changed tensor and notes for the user."""
    from ..gguf_arch import FILE_TYPES
    from ..gguf_file import import_gguf
    from ..quant.gguf_codec import target_type

    gguf = import_gguf()
    if out_type is not None and out_type not in OUT_TYPES:
        raise UsageError(f"a GGUF merge writes {', '.join(OUT_TYPES)}, not {out_type}")
    unknown = sorted(set(ops_by_name) - set(checkpoint.tensors))
    if unknown:
        raise UsageError(f"{checkpoint.path}: no tensors named {summarize(unknown, 3)}")
    plans = _plan(checkpoint, ops_by_name, out_type, target_type)
    writer = gguf.GGUFWriter(os.fspath(output_path), checkpoint.architecture)
    if gguf.Keys.General.ARCHITECTURE not in checkpoint.reader.fields:
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # some stable-diffusion.cpp files have none
    skipped = _copy_metadata(checkpoint.reader, writer, gguf)
    if out_type is not None and out_type in FILE_TYPES:
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[out_type]))
    for plan in plans:
        writer.add_tensor_info(plan.place.stored_name, plan.byte_shape(gguf), _uint8(), plan.nbytes(),
                               raw_dtype=gguf.GGMLQuantizationType[plan.type_name])
    figures: list[RoundingFigure] = []
    fallbacks: dict[str, list[_Plan]] = {}
    total = sum(checkpoint.tensors[plan.name].nbytes for plan in plans)
    done = 0
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            data, figure = _tensor_data(checkpoint, plan, ops_by_name.get(plan.name), merged)
            writer.write_tensor_data(data)
            if figure is not None:
                figures.append(figure)
            if plan.changed and plan.type_name != plan.wanted:
                fallbacks.setdefault(plan.type_name, []).append(plan)
            done += checkpoint.tensors[plan.name].nbytes
            if progress is not None:
                progress(done, total)
    finally:
        writer.close()
    notes = [_fallback_note(chosen, group) for chosen, group in fallbacks.items()]
    if skipped:
        notes.append(f"metadata not copied (empty or nested arrays, which the gguf writer cannot write): "
                     f"{summarize(skipped, 3)}")
    return figures, notes


def _fallback_note(chosen: str, group: list[_Plan]) -> str:
    names = summarize([plan.name for plan in group], 3)
    wanted = ", ".join(sorted({plan.wanted for plan in group}))
    if chosen == FALLBACK:
        return (f"{len(group)} changed tensor(s) written as {chosen}, the nearest more precise type the gguf package "
                f"can write (it cannot write {wanted}): {names}")
    return (f"{len(group)} changed tensor(s) written as {chosen}: their rows do not fill whole {wanted} blocks, "
            f"which llama.cpp also keeps in a float type: {names}")


class _Plan:
    """One tensor of the output: the type asked for, the type written, and whether it changed."""

    def __init__(self, name: str, place: Any, wanted: str, type_name: str, changed: bool) -> None:
        self.name, self.place, self.wanted, self.type_name, self.changed = name, place, wanted, type_name, changed

    @property
    def copied(self) -> bool:
        return not self.changed and self.type_name == self.place.type_name

    def nbytes(self) -> int:
        from ..quant.gguf_codec import stored_nbytes

        return stored_nbytes(self.place.stored_shape, self.type_name)

    def byte_shape(self, gguf) -> tuple[int, ...]:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.type_name]]
        shape = self.place.stored_shape or (1,)
        return (*shape[:-1], shape[-1] // block * type_size)


def _plan(checkpoint: GgufCheckpoint, ops_by_name: Mapping[str, list], out_type: str | None, target_type
          ) -> list[_Plan]:
    plans = []
    for name, place in checkpoint.places.items():
        changed = name in ops_by_name
        row = place.stored_shape[-1] if place.stored_shape else 1
        wanted = out_type if out_type is not None and (changed or len(place.stored_shape) >= 2) else place.type_name
        chosen = target_type(wanted, row)[0]
        if not changed and chosen != wanted:
            chosen = place.type_name  # an unchanged tensor is converted only where `out_type` holds its rows
        plans.append(_Plan(name, place, wanted, chosen, changed))
    return plans


def _uint8():
    import numpy as np

    return np.dtype(np.uint8)


def _tensor_data(checkpoint: GgufCheckpoint, plan: _Plan, ops: list | None, merged: MergedFn):
    """(the bytes to write, a rounding figure for a changed tensor). Beyond the base and merged tensors,
    requantizing and tallying take one block of rows at a time, in the file's row order (the figures
    are sums over rows, so the order does not change them)."""
    import numpy as np
    import torch

    from ..quant.gguf_codec import dequantize_bytes

    physical = checkpoint.stored[plan.place.stored_name]
    raw = checkpoint.read_stored(physical).numpy()
    if plan.copied:
        return raw, None
    stored = torch.from_numpy(dequantize_bytes(raw, plan.place.type_name))
    del raw
    if not plan.changed:
        return _requantized(stored, plan.type_name, None, None), None
    base = checkpoint.from_stored(plan.name, stored)
    exact = merged(base, plan.name, ops or [])
    if tuple(exact.shape) != tuple(base.shape):
        raise UsageError(f"merged {plan.name} has shape {list(exact.shape)}, the base {list(base.shape)}")
    tally = RoundingTally()
    data = _requantized(checkpoint.to_stored(plan.name, exact.to(torch.float32)), plan.type_name, stored, tally)
    encoding = checkpoint.tensors[plan.name].encoding.describe()
    shown = encoding if plan.type_name == encoding else f"{encoding}→{plan.type_name}"
    return np.ascontiguousarray(data), tally.figure(plan.name, shown)


def _requantized(values: torch.Tensor, type_name: str, base: torch.Tensor | None, tally: RoundingTally | None):
    """`values` (stored order and shape) quantized as `type_name`, a block of rows at a time; with a
    tally, each block's rounding is added against `base` (the same rows dequantized from the base)."""
    import numpy as np
    import torch

    from ..quant.gguf_codec import CHUNK_VALUES, dequantize_bytes, requantize

    rows = values.reshape(-1, values.shape[-1]) if values.dim() else values.reshape(1, 1)
    base_rows = base.reshape(rows.shape) if base is not None else None
    step = max(1, CHUNK_VALUES // max(1, rows.shape[1]))
    parts = []
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        data, chosen, _ = requantize(block, type_name)
        assert chosen == type_name, (chosen, type_name)
        if tally is not None:
            written = torch.from_numpy(dequantize_bytes(data, chosen))
            tally.add(base_rows[start:start + step], block, written)
        parts.append(data)
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return data.reshape(*values.shape[:-1], data.shape[-1]) if values.dim() else data


def _copy_metadata(reader, writer, gguf) -> list[str]:
    """Add every key/value of the base with its own GGUF type; returns the keys that could not be."""
    value_type = gguf.GGUFValueType
    skipped = []
    for key, entry in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        kind = entry.types[0]
        if kind == value_type.ARRAY:
            sub = entry.types[-1]
            if len(entry.types) != 2 or not len(entry.data):
                skipped.append(key)
                continue
            if sub == value_type.STRING:
                value = [bytes(entry.parts[i]) for i in entry.data]
            else:
                value = entry.contents()
            writer.add_key_value(key, value, kind, sub_type=sub)
        elif kind == value_type.STRING:
            writer.add_key_value(key, bytes(entry.parts[entry.data[0]]), kind)
        else:
            writer.add_key_value(key, entry.parts[entry.data[0]].tolist()[0], kind)
        if key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(entry.parts[entry.data[0]].tolist()[0])
    return skipped
