"""`merge`: fold adapters into base weights, streaming one tensor at a time."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.output import atomic_output, check_output_path
from ..checkpoint.pipeline import BackgroundWriter, BufferPool, ReadAhead
from ..checkpoint.writer import PlannedTensor, SafetensorsWriter, plan_shards, shard_names, write_index
from ..dtypes import MERGEABLE_FLOATS, parse_output_dtype, torch_dtype_name
from ..errors import NonFiniteError, UsageError
from ..formats import load_adapter
from ..formats.names import modules_of
from ..lora.delta import COMPUTE_DTYPE, add_deltas_blockwise, apply_dora_, as_2d, delta_factors
from ..lora.module import Adapter
from .merge_plan import BiasOp, DeltaOp, MergePlan, ReplaceOp, parse_weights, plan_merge

INDEX_NAME = "model.safetensors.index.json"
#: Changed tensors stream through the merge in row chunks of at most this many bytes...
CHUNK_BYTES = 16 << 20
#: ...held in this many reused buffers (reader, arithmetic, writer queue, writer), so memory is fixed.
POOL_BUFFERS = 5
#: Called after each tensor with (bytes just written, total bytes to write).
ProgressCallback = Callable[[int, int], None]


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    tensors: int
    tensors_changed: int
    bytes_written: int
    seconds: float
    adapters: list[str]
    weights: list[float]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "files": self.files,
            "tensors": self.tensors,
            "tensors_changed": self.tensors_changed,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "adapters": self.adapters,
            "weights": self.weights,
            "notes": self.notes,
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def _layout(base: Checkpoint, out_dtype: torch.dtype | None, max_shard_bytes: int | None) -> dict[str, list[PlannedTensor]]:
    """Output file name -> tensors in write order. By default each base file maps to a file of the
    same name holding the same tensors; `max_shard_bytes` (or a pickle base) re-plans HF-style shards."""

    def planned(name: str) -> PlannedTensor:
        info = base[name]
        dtype = info.torch_dtype
        if out_dtype is not None and dtype in MERGEABLE_FLOATS:
            dtype = out_dtype
        return PlannedTensor(name=name, dtype=dtype, shape=info.shape)

    in_file_order = sorted(base, key=lambda n: (base[n].path.name, base[n].data_start))
    if not base.is_folder:
        return {"": [planned(n) for n in in_file_order]}
    if max_shard_bytes is None and base.pickled is None:
        layout: dict[str, list[PlannedTensor]] = {}
        for name in in_file_order:
            layout.setdefault(base[name].path.name, []).append(planned(name))
        return layout
    shards = plan_shards([planned(n) for n in in_file_order], max_shard_bytes or 5 * 10**9)
    return dict(zip(shard_names(len(shards)), shards))


def fits_dtype(low: float, high: float, dtype: torch.dtype) -> bool:
    """Whether float32 values in [low, high] are finite and stay finite when rounded to `dtype`."""
    limit = torch.finfo(dtype).max
    return math.isfinite(low) and math.isfinite(high) and max(-low, high) <= limit


def _term(op: DeltaOp | BiasOp, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A plain LoRA op as alpha·left@right on the 2-D view of its tensor; a bias is a rank-1 column."""
    alpha = op.weight * op.module.scale
    if isinstance(op, BiasOp):
        bias = op.module.bias.to(device=device, dtype=COMPUTE_DTYPE)
        return bias.reshape(-1, 1), torch.ones(1, 1, device=device), alpha
    left, right = delta_factors(op.module, op.transposed, device)
    return left, right, alpha


def _merged_tensor(original: torch.Tensor, name: str, ops: list, device: torch.device,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """The merged tensor in `out_dtype`, and whether all its values are finite."""
    original = original.to(device)
    weight = original
    if isinstance(ops[0], ReplaceOp):
        first, ops = ops[0], ops[1:]
        if first.weight != 1.0 and not torch.equal(first.tensor.to(device=device, dtype=original.dtype), original):
            raise _unscalable(name, first)
        weight = first.tensor.to(device)
    if any(isinstance(op, DeltaOp) and op.module.is_dora for op in ops):
        return _merged_with_dora(weight, ops, out_dtype)
    terms = [_term(op, device) for op in ops]
    in_place = weight is original and weight.dtype == out_dtype
    out = weight if in_place else torch.empty(weight.shape, dtype=out_dtype, device=device)
    low, high = add_deltas_blockwise(weight, out, terms)
    return out, fits_dtype(low, high, out_dtype)


def _unscalable(name: str, op: ReplaceOp) -> UsageError:
    return UsageError(f"{name} is replaced outright by {op.source} (modules_to_save), which cannot be scaled by "
                      f"weight {op.weight}; merge that adapter with weight 1")


def _merged_with_dora(weight: torch.Tensor, ops: list, out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """DoRA rescales whole rows by norms of the full update, so it works on the full float32 weight."""
    acc = weight.to(COMPUTE_DTYPE, copy=True)
    unmerged = acc.clone()
    for op in ops:
        if isinstance(op, DeltaOp) and op.module.is_dora:
            apply_dora_(acc, unmerged, op.module, op.transposed)
        else:
            left, right, alpha = _term(op, acc.device)
            as_2d(acc).addmm_(left, right, alpha=alpha)
    low, high = (v.item() for v in torch.aminmax(acc))
    return acc.to(out_dtype), fits_dtype(low, high, out_dtype)


def _update_config(path: Path, dtype: torch.dtype) -> None:
    config = json.loads(path.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = torch_dtype_name(dtype)
    path.write_text(json.dumps(config, indent=2) + "\n")


def merge(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike | Adapter],
    output: str | os.PathLike,
    weights: Sequence[float] | None = None,
    dtype: str = "auto",
    max_shard_bytes: int | None = None,
    device: str = "auto",
    force: bool = False,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
    adapter_format: str | None = None,
    alpha: float | None = None,
) -> MergeResult:
    """Merge `adapters` into `base`, writing `output` (file -> file, folder -> folder) atomically.

    W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ per targeted weight, computed in float32 and rounded to the output dtype
    once. DoRA adapters apply their magnitude on top, as PEFT's merge does. Adapters may be in any
    format loratool reads; kohya names are resolved against BASE.
    """
    started = time.perf_counter()
    output = Path(output)
    out_dtype = parse_output_dtype(dtype)
    torch_device = resolve_device(device)
    if not adapters:
        raise UsageError("give at least one adapter to merge")
    with open_checkpoint(base, allow_pickle=allow_pickle) as checkpoint:
        index = {None: modules_of(checkpoint)}
        loaded = [a if isinstance(a, Adapter) else
                  load_adapter(a, format=adapter_format, allow_pickle=allow_pickle, base=index, alpha=alpha)
                  for a in adapters]
        weights = parse_weights(list(weights) if weights is not None else None, len(loaded))
        check_output_path(output, [Path(base)] + [a.path for a in loaded], force)
        if not checkpoint.is_folder and output.suffix != ".safetensors":
            raise UsageError(f"BASE is a single file, so OUT must be a .safetensors file, got {output}")
        plan = plan_merge(checkpoint, loaded, weights, out_dtype, allow_nonfinite)
        layout = _layout(checkpoint, out_dtype, max_shard_bytes)
        with atomic_output(output, checkpoint.is_folder) as temp:
            written = _write(checkpoint, plan, layout, temp, torch_device, allow_nonfinite, progress)
            if checkpoint.is_folder:
                _finish_folder(checkpoint, layout, temp, out_dtype)
    return MergeResult(
        output=output,
        files=[f for f in layout if f] or [output.name],
        tensors=len(checkpoint),
        tensors_changed=len(plan.ops),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        adapters=[str(a.path) for a in loaded],
        weights=weights,
        notes=plan.notes,
    )


def _streamable(checkpoint: Checkpoint, name: str, ops: list) -> bool:
    """Plain LoRA updates, bare casts and replacements (modules_to_save, PEFT's saved embedding
    `base_layer`) are row-local, so they can stream in row chunks; DoRA (row norms of the whole update)
    and pickle bases go whole. A new kind of op must be added here (and to `_term`) before it can stream."""
    info = checkpoint[name]
    if checkpoint.pickled is not None or not info.shape or not info.shape[0] or not checkpoint.row_bytes(name):
        return False
    if ops and type(ops[0]) is ReplaceOp:
        ops = ops[1:]
    return all(type(op) is BiasOp or (type(op) is DeltaOp and not op.module.is_dora) for op in ops)


def _row_chunks(checkpoint: Checkpoint, name: str) -> list[tuple[int, int]]:
    rows = checkpoint[name].shape[0]
    step = max(1, CHUNK_BYTES // checkpoint.row_bytes(name))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _compute_threads(device: torch.device) -> int:
    """Threads for the arithmetic. The reader and writer threads keep one core busy with page copies,
    and on a small or shared machine two OpenMP threads that get descheduled make `addmm_` several
    times slower, while one thread already updates about 2 GB/s of bf16 weights."""
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), 4, (os.cpu_count() or 1) - 2))


def _write(checkpoint: Checkpoint, plan: MergePlan, layout: dict[str, list[PlannedTensor]], temp: Path,
           device: torch.device, allow_nonfinite: bool, progress: ProgressCallback | None) -> int:
    """Stream every output tensor, in file order: untouched ones copied byte for byte by the writer
    thread; plain LoRA targets and replacements read, updated and written in row chunks through a
    fixed pool of buffers (reader thread → arithmetic here → writer thread); DoRA targets whole."""
    total = sum(item.nbytes for items in layout.values() for item in items)
    kinds: dict[str, str] = {}
    requests: list[tuple[str, int | None, int | None]] = []
    for items in layout.values():
        for item in items:
            ops = plan.ops.get(item.name) or []
            if not ops and checkpoint.pickled is None and checkpoint[item.name].torch_dtype == item.dtype:
                kinds[item.name] = "copy"
            elif _streamable(checkpoint, item.name, ops):
                kinds[item.name] = "stream"
                requests += [(item.name, start, stop) for start, stop in _row_chunks(checkpoint, item.name)]
            else:
                kinds[item.name] = "whole"
                requests.append((item.name, None, None))
    stop = threading.Event()
    pool = BufferPool(POOL_BUFFERS, CHUNK_BYTES, stop) if "stream" in kinds.values() else None

    def read(request):
        name, start, end = request
        if start is None:
            return None, checkpoint.read(name)
        buffer = pool.take() if (end - start) * checkpoint.row_bytes(name) <= pool.size else None
        return buffer, checkpoint.read_rows(name, start, end, buffer)

    threads = torch.get_num_threads()
    torch.set_num_threads(_compute_threads(device))
    reader = ReadAhead(read, requests, depth=1, stop=stop)
    background = BackgroundWriter()
    scratch = torch.empty(1 << 18, dtype=COMPUTE_DTYPE, device=device)
    try:
        for file_name, items in layout.items():
            writer = SafetensorsWriter(temp / file_name if file_name else temp, items)
            for item in items:
                source, kind = checkpoint[item.name], kinds[item.name]
                ops = plan.ops.get(item.name)
                if kind == "copy":
                    background.submit(partial(writer.copy_raw, item.name, checkpoint.fd(source.path), source))
                elif kind == "stream":
                    _stream_tensor(item, ops or [], reader, background, writer, pool, device, scratch,
                                   check=bool(ops) and not allow_nonfinite)
                else:
                    _, tensor = reader.get()
                    if ops:
                        tensor, finite = _merged_tensor(tensor, item.name, ops, device, item.dtype)
                        if not allow_nonfinite and not finite:
                            raise _nonfinite(item)
                    else:
                        tensor = tensor.to(item.dtype)
                    background.submit(partial(writer.write, item.name, tensor))
                if progress:
                    progress(item.nbytes, total)
            background.submit(writer.finish)
        background.close()
    except BaseException:
        stop.set()
        background.abort()
        raise
    finally:
        reader.close()
        torch.set_num_threads(threads)
    return total


def _nonfinite(item: PlannedTensor) -> NonFiniteError:
    return NonFiniteError(
        f"merged {item.name} holds NaN/Inf (overflow in {torch_dtype_name(item.dtype)}?); "
        "try --dtype float32, or --allow-nonfinite to write it anyway"
    )


def _stream_tensor(item: PlannedTensor, ops: list, reader: ReadAhead, background: BackgroundWriter,
                   writer: SafetensorsWriter, pool: BufferPool, device: torch.device, scratch: torch.Tensor,
                   check: bool) -> None:
    """W' = round(W + Σ terms) one row chunk at a time: each chunk is updated in place in its pooled
    buffer when the dtype stays (else into a new one), and the buffer goes back to the pool once written.
    A replacement supplies W's rows instead of the base (which it must equal unless its weight is 1)."""
    replace = ops[0] if ops and type(ops[0]) is ReplaceOp else None
    replacement = replace.tensor.to(device) if replace is not None else None
    terms = [_term(op, device) for op in (ops[1:] if replace is not None else ops)]
    low, high, saw_nan = math.inf, -math.inf, False
    background.submit(partial(writer.begin, item.name))
    row = 0
    while row < item.shape[0]:
        buffer, rows = reader.get()
        release = partial(pool.give, buffer) if buffer is not None else None
        try:
            weight = rows.to(device)
            source = weight
            if replacement is not None:
                source = replacement[row:row + len(weight)]
                if replace.weight != 1.0 and not torch.equal(source.to(weight.dtype), weight):
                    raise _unscalable(item.name, replace)
            out = weight if weight.dtype == item.dtype else torch.empty(weight.shape, dtype=item.dtype, device=device)
            chunk_terms = [(left[row:row + len(weight)], right, alpha) for left, right, alpha in terms]
            chunk_low, chunk_high = add_deltas_blockwise(source, out, chunk_terms, scratch=scratch)
        except BaseException:
            if release is not None:
                release()
            raise
        saw_nan = saw_nan or math.isnan(chunk_low)
        low, high = min(low, chunk_low), max(high, chunk_high)
        background.submit(partial(writer.append, out), cleanup=release)
        row += len(weight)
    if check and (saw_nan or not fits_dtype(low, high, item.dtype)):
        raise _nonfinite(item)
    background.submit(writer.end)


def _finish_folder(checkpoint: Checkpoint, layout: dict[str, list[PlannedTensor]], temp: Path,
                   out_dtype: torch.dtype | None) -> None:
    if len(layout) > 1 or checkpoint.index_path is not None:
        index_name = checkpoint.index_path.name if checkpoint.index_path and checkpoint.pickled is None else INDEX_NAME
        write_index(temp / index_name, layout)
    for companion in checkpoint.companion_files():
        shutil.copy2(companion, temp / companion.name)
    if out_dtype is not None and (temp / "config.json").is_file():
        _update_config(temp / "config.json", out_dtype)
