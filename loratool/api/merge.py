"""`merge`: fold adapters into base weights, streaming one tensor at a time."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..checkpoint.output import atomic_output, check_output_path, copy_regular, copy_regular_file, read_paths
from ..checkpoint.pipeline import BackgroundWriter, BufferPool, ReadAhead
from ..checkpoint.writer import PlannedTensor, SafetensorsWriter, plan_shards, shard_names, write_index
from ..checkpoint.quantized import MARKER, is_marker
from ..checkpoint.reader import GGUF_SUFFIX
from ..dtypes import FP8_OUTPUT, GGUF_OUTPUTS, MERGEABLE_FLOATS, parse_output_dtype, torch_dtype_name
from ..errors import NonFiniteError, UsageError, summarize
from ..formats.adapters import load_adapter
from ..layouts import open_base
from ..lora.delta import COMPUTE_DTYPE, add_deltas_blockwise, as_2d
from ..lora.module import Adapter
from ..options import parse_weights, resolve_device
from ..quant import is_opaque
from ..quant.report import RoundingFigure
from ..quant.report import summary as rounding_summary
from ..quant.report import warning as rounding_warning
from .merge_plan import BiasOp, DeltaOp, MergePlan, ReplaceOp, plan_merge
from ..quant.fp8 import STORAGE_DTYPES
from .merge_quant import NEW_FP8, Fp8Target, requantize
from .merge_ray import shard_tasks

INDEX_NAME = "model.safetensors.index.json"
#: Changed tensors stream through the merge in row chunks of at most this many bytes...
CHUNK_BYTES = 16 << 20
#: ...held in this many reused buffers (reader, arithmetic, writer queue, writer), so memory is fixed.
POOL_BUFFERS = 5
#: The prefix of a diffusion model inside a full single-file checkpoint (ComfyUI's marker goes under it).
DIFFUSION_PREFIX = "model.diffusion_model."
#: `--dtype` float outputs of a GGUF base, as GGUF types.
GGUF_FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
#: ComfyUI's header metadata entry describing quantized layers.
QUANT_METADATA = "_quantization_metadata"
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
    layout: dict = field(default_factory=dict)
    #: Adapter modules the base lacks, left out with `skip_missing` ("adapter: module").
    skipped: list[str] = field(default_factory=list)
    #: With `ray`: where the shard tasks ran (`ClusterReport.to_json()`).
    cluster: dict | None = None
    #: What requantization did to each changed quantized tensor (`quant/report.py`).
    rounding: list[RoundingFigure] = field(default_factory=list)

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
            "layout": self.layout,
            "skipped": self.skipped,
            "cluster": self.cluster,
            "rounding": [figure.to_json() for figure in self.rounding],
        }


@dataclass(frozen=True)
class OutputTarget:
    """What `--dtype` asks of the output: a float type for every float tensor (quantized ones
    dequantized), or None to keep each tensor's own encoding; `fp8` also quantizes the plain float
    matrices into ComfyUI's scaled FP8; `gguf_type` converts a GGUF base's tensors to that type."""

    float_dtype: torch.dtype | None = None
    fp8: bool = False
    gguf_type: str | None = None

    @classmethod
    def parse(cls, name: str) -> OutputTarget:
        if name == FP8_OUTPUT:
            return cls(fp8=True)
        if name in GGUF_OUTPUTS:
            return cls(gguf_type=GGUF_OUTPUTS[name])
        return cls(float_dtype=parse_output_dtype(name))


def _quantizable(name: str, info) -> bool:
    """The tensors `--dtype float8_e4m3fn` quantizes, as ComfyUI's scaled FP8 files do: the matrices of
    linear layers; norms, biases and embeddings stay as they are."""
    leaf = name.rpartition(".")[0].rpartition(".")[2]
    return (info.encoding is None and name.endswith(".weight") and len(info.shape) == 2
            and info.torch_dtype in MERGEABLE_FLOATS and "norm" not in leaf and "embed" not in leaf)


def _fp8_prefix(base: Checkpoint) -> str:
    """Where `--dtype float8_e4m3fn` quantizes: under the diffusion model's prefix in a full single-file
    checkpoint (its text encoders and VAE stay as they are, as in ComfyUI's files), else everywhere."""
    return DIFFUSION_PREFIX if any(n.startswith(DIFFUSION_PREFIX) for n in base) else ""


def _planned_parts(base: Checkpoint, name: str, target: OutputTarget, fp8_prefix: str) -> list[PlannedTensor]:
    """The physical tensors one logical tensor is written as, consecutive in the output."""
    info = base[name]
    encoding = info.encoding
    if encoding is not None:
        if target.float_dtype is None:
            return [PlannedTensor(p.name, p.torch_dtype, p.shape) for p in encoding.parts]
        return [PlannedTensor(name, target.float_dtype, info.shape)]
    if target.fp8 and name.startswith(fp8_prefix) and _quantizable(name, info):
        return [PlannedTensor(name, NEW_FP8.dtype, info.shape),
                PlannedTensor(name.removesuffix("weight") + NEW_FP8.scale_name, NEW_FP8.scale_dtype, ())]
    dtype = info.torch_dtype
    if target.float_dtype is not None and dtype in MERGEABLE_FLOATS:
        dtype = target.float_dtype
    return [PlannedTensor(name=name, dtype=dtype, shape=info.shape)]


def _markers(base: Checkpoint, target: OutputTarget, fp8_prefix: str) -> list[PlannedTensor]:
    """ComfyUI's `scaled_fp8` marker: kept with the encodings, dropped with them, added by `--dtype
    float8_e4m3fn` (under the diffusion model's prefix, where ComfyUI looks for it)."""
    if target.float_dtype is not None:
        return []
    if base.markers or not target.fp8:
        return [PlannedTensor(m.name, m.torch_dtype, m.shape) for m in base.markers]
    if not any(n.startswith(fp8_prefix) and _quantizable(n, base[n]) for n in base):
        return []
    return [PlannedTensor(fp8_prefix + MARKER, NEW_FP8.dtype, (0,))]


def _layout(base: Checkpoint, target: OutputTarget, max_shard_bytes: int | None) -> dict[str, list[PlannedTensor]]:
    """Output file name -> tensors in write order. By default each base file maps to a file of the
    same name holding the same tensors; `max_shard_bytes` (or a pickle base) re-plans HF-style shards.
    A quantized tensor's parts stay together, after its values."""
    fp8_prefix = _fp8_prefix(base) if target.fp8 else ""

    def planned(name: str) -> list[PlannedTensor]:
        return _planned_parts(base, name, target, fp8_prefix)

    in_file_order = sorted(base, key=lambda n: (base[n].path.name, base[n].data_start))
    markers = _markers(base, target, fp8_prefix)
    if not base.is_folder:
        return {"": markers + [part for n in in_file_order for part in planned(n)]}
    if max_shard_bytes is None and base.pickled is None:
        layout: dict[str, list[PlannedTensor]] = {}
        for name in in_file_order:
            layout.setdefault(base[name].path.name, []).extend(planned(name))
        return layout
    shards = plan_shards([part for n in in_file_order for part in planned(n)], max_shard_bytes or 5 * 10**9)
    return dict(zip(shard_names(len(shards)), shards))


def fits_dtype(low: float, high: float, dtype: torch.dtype) -> bool:
    """Whether float32 values in [low, high] are finite and stay finite when rounded to `dtype`."""
    limit = torch.finfo(dtype).max
    return math.isfinite(low) and math.isfinite(high) and max(-low, high) <= limit


def _term(op: DeltaOp | BiasOp, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """A streamable op as alpha·left@right on the 2-D view of its tensor, from row `offset` on; a bias
    update is a rank-1 column."""
    offset = op.rows[0] if op.rows else 0
    if isinstance(op, BiasOp):
        bias = op.module.bias_delta(COMPUTE_DTYPE, device)
        return bias.reshape(-1, 1), torch.ones(1, 1, device=device), op.weight, offset
    left, right = op.module.factors(op.transposed, device)
    return left, right, op.weight * op.module.scale, offset


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
    if any(isinstance(op, DeltaOp) and not op.module.streams for op in ops):
        return _merged_whole(weight, ops, out_dtype)
    terms = [_term(op, device) for op in ops]
    in_place = weight is original and weight.dtype == out_dtype
    out = weight if in_place else torch.empty(weight.shape, dtype=out_dtype, device=device)
    low, high = add_deltas_blockwise(weight, out, terms)
    return out, fits_dtype(low, high, out_dtype)


def _unscalable(name: str, op: ReplaceOp) -> UsageError:
    return UsageError(f"{name} is replaced outright by {op.source} (modules_to_save), which cannot be scaled by "
                      f"weight {op.weight}; merge that adapter with weight 1")


def _merged_whole(weight: torch.Tensor, ops: list, out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """DoRA rescales whole rows (or columns) by norms of the full update, and modules without factors
    (LoHa, LoKr, full diffs) form their dense ΔW, so these work on the full float32 weight. Every DoRA
    norm is taken over the unmerged weight plus that adapter's own ΔW, as PEFT and LyCORIS compute it."""
    acc = weight.to(COMPUTE_DTYPE, copy=True)
    unmerged = acc.clone() if any(isinstance(op, DeltaOp) and op.module.is_dora for op in ops) else acc
    for op in ops:
        rows = slice(*op.rows) if op.rows else slice(None)
        if isinstance(op, DeltaOp):
            op.module.merge_into(acc[rows], unmerged[rows], op.weight, op.transposed)
        else:
            left, right, alpha, offset = _term(op, acc.device)
            as_2d(acc)[offset:offset + left.shape[0]].addmm_(left, right, alpha=alpha)
    low, high = (v.item() for v in torch.aminmax(acc))
    return acc.to(out_dtype), fits_dtype(low, high, out_dtype)


def _update_config(path: Path, dtype: torch.dtype) -> None:
    """The dtype a float output is in; a dequantized FP8 checkpoint also loses its quantization_config."""
    config = json.loads(path.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = torch_dtype_name(dtype)
    if isinstance(config.get("quantization_config"), dict) and config["quantization_config"].get("quant_method") == "fp8":
        del config["quantization_config"]
    path.write_text(json.dumps(config, indent=2) + "\n")


def default_output(base: Path, adapters: Sequence[Path], folder: Path | None = None) -> Path:
    """`<base>+<adapter>[+…]` in `folder` (the current directory), with the base's suffix, and a
    numbered suffix where that name is taken: merging never overwrites anything by default.

    Each name is the real name of the path: a file's stem, a folder's own name even when it was given as
    `.`, `..` or `dir/` (so a PEFT adapter read from `./adapter_model.safetensors`, whose path is its
    folder, is named after that folder). Symlinks keep the name the user gave them."""
    folder = folder or Path.cwd()

    def stem(path: Path, fallback: str) -> str:
        path = Path(os.path.abspath(path))
        name = path.name[: -len(path.suffix)] if path.is_file() and path.suffix else path.name
        return name or fallback

    names = [stem(base, "base")] + [stem(a, "adapter") for a in adapters]
    suffix = base.suffix if base.is_file() else ""
    name = "+".join(names)
    if len(name) > 120:
        name = f"{names[0]}+{len(adapters)}-adapters"
    candidate, number = folder / f"{name}{suffix}", 2
    while candidate.exists() or candidate.is_symlink():
        candidate, number = folder / f"{name}-{number}{suffix}", number + 1
    return candidate


def merge(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike | Adapter],
    output: str | os.PathLike | None = None,
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
    skip_missing: bool = False,
    ray: str | None = None,
    gpus_per_task: float | None = None,
) -> MergeResult:
    """Merge `adapters` into `base`, writing `output` (file -> file, folder -> folder) atomically.

    W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ per targeted weight, computed in float32 and rounded to the output dtype
    once. DoRA adapters apply their magnitude on top, as PEFT's merge does. Adapters may be in any
    format loratool reads, named in any dialect the base's layout knows (LDM or diffusers UNet names,
    BFL or diffusers Flux names, CLIP with or without `text_model.`). A diffusers pipeline folder merges
    into a folder of the same layout. Without `output`, the result goes to the current directory
    under a name made of the base's and the adapters' names. An adapter module the base lacks is refused,
    or with `skip_missing` left out and listed in the result's `skipped`.
    """
    started = time.perf_counter()
    target = OutputTarget.parse(dtype)
    torch_device = resolve_device(device) if ray is None else None  # with ray, each task's node decides
    if not adapters:
        raise UsageError("give at least one adapter to merge")
    base = Path(base)
    layout, checkpoints = open_base(base, allow_pickle=allow_pickle)
    try:
        loaded = [a if isinstance(a, Adapter) else
                  load_adapter(a, format=adapter_format, allow_pickle=allow_pickle, alpha=alpha)
                  for a in adapters]
        weights = parse_weights(list(weights) if weights is not None else None, len(loaded))
        output = Path(output) if output is not None else default_output(base, [a.path for a in loaded])
        check_output_path(output, [base, *(p for g, a in zip(adapters, loaded) for p in read_paths(g, a.path))],
                          force)
        single_file = None in checkpoints and not checkpoints[None].is_folder
        gguf = single_file and checkpoints[None].path.suffix == GGUF_SUFFIX
        _check_target(target, gguf, single_file, checkpoints)
        if single_file and output.suffix != checkpoints[None].path.suffix:
            raise UsageError(f"BASE is a single {checkpoints[None].path.suffix} file, so OUT must be one too, "
                             f"got {output}")
        if not single_file and output.suffix == ".safetensors":
            raise UsageError(f"BASE is a folder, so OUT is a folder too; give a folder name, not {output}")
        plans = plan_merge(layout, checkpoints, loaded, weights, target.float_dtype, allow_nonfinite, skip_missing)
        if gguf:
            result = _merge_gguf(checkpoints[None], plans[None], output, target, torch_device or resolve_device(device),
                                 allow_nonfinite, progress, started, loaded, weights, layout)
            if ray is not None:
                result.notes.append("a GGUF base is one file, so it was merged here, not on the Ray cluster")
            return result
        layouts = {source: _layout(checkpoint, target, max_shard_bytes) for source, checkpoint in checkpoints.items()}
        total = sum(item.nbytes for layout_ in layouts.values() for items in layout_.values() for item in items)
        report = _progress_over(progress, total)
        with atomic_output(output, not single_file) as temp, shard_tasks(
                ray, gpus_per_task, device, base, checkpoints, allow_pickle, temp, progress, _write) as shards:
            if None not in checkpoints:
                _copy_pipeline_files(base, temp, set(checkpoints))
            written = 0
            figures: list[RoundingFigure] = []
            for source, checkpoint in checkpoints.items():
                folder = temp if source is None else temp / source
                if source is not None:
                    folder.mkdir()
                write = shards.submit if shards else _write  # with --ray, one cluster task per output file
                written += write(checkpoint, plans[source], layouts[source], folder, torch_device, allow_nonfinite,
                                 report, figures)
                if checkpoint.is_folder:
                    _finish_folder(checkpoint, layouts[source], folder, target.float_dtype)
                if source is not None:
                    _copy_component_extras(base / source, folder)
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()
    files = [f"{source}/{f}" if source else f for source, layout_ in layouts.items() for f in layout_ if f]
    return MergeResult(
        output=output,
        files=files or [output.name],
        tensors=sum(len(c) for c in checkpoints.values()),
        tensors_changed=sum(len(p.ops) for p in plans.values()),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        adapters=[str(a.path) for a in loaded],
        weights=weights,
        notes=[note for plan in plans.values() for note in plan.notes] + _skipped_note(plans) + _rounding_notes(figures),
        layout=layout.describe(),
        skipped=[name for plan in plans.values() for name in plan.skipped],
        cluster=shards.report.to_json() if shards else None,
        rounding=figures,
    )


def _check_target(target: OutputTarget, gguf: bool, single_file: bool, checkpoints: dict) -> None:
    if target.gguf_type is not None and not gguf:
        raise UsageError("--dtype q8_0 writes a GGUF file, so BASE must be a .gguf file (convert the model to GGUF "
                         "with llama.cpp or ComfyUI-GGUF first, then merge into it)")
    if target.fp8 and (gguf or not single_file):
        raise UsageError("--dtype float8_e4m3fn writes ComfyUI's scaled FP8 single files, so BASE must be a "
                         ".safetensors file; an FP8 folder keeps its own encoding with --dtype auto")
    if target.float_dtype is not None:
        opaque = [name for checkpoint in checkpoints.values() for name, info in checkpoint.items()
                  if is_opaque(info)]
        if opaque:
            raise UsageError(f"BASE holds {len(opaque)} layer(s) in a ComfyUI format loratool cannot dequantize "
                             f"({summarize(opaque, 3)}); keep them as stored with --dtype auto")


def _rounding_notes(figures: list[RoundingFigure]) -> list[str]:
    notes = [rounding_summary(figures)] if figures else []
    warning = rounding_warning(figures)
    return notes + ([warning] if warning else [])


def _merge_gguf(checkpoint: Checkpoint, plan: MergePlan, output: Path, target: OutputTarget, device: torch.device,
                allow_nonfinite: bool, progress: ProgressCallback | None, started: float, loaded: list[Adapter],
                weights: list[float], layout) -> MergeResult:
    """A GGUF base is rewritten by `merge_gguf.py`: changed tensors requantized in their type (or the
    `--dtype` one), the rest and every metadata value copied."""
    from .merge_gguf import write_gguf_merge

    def merged(base: torch.Tensor, name: str, ops: list) -> torch.Tensor:
        tensor, finite = _merged_tensor(base.clone(), name, ops, device, COMPUTE_DTYPE)
        if not finite and not allow_nonfinite:
            raise _nonfinite(PlannedTensor(name, COMPUTE_DTYPE, tuple(base.shape)))
        return tensor

    out_type = target.gguf_type or (GGUF_FLOAT_TYPES[target.float_dtype] if target.float_dtype is not None else None)
    with atomic_output(output, False) as temp:
        figures, notes = write_gguf_merge(checkpoint, plan.ops, temp, merged, out_type, progress)
    return MergeResult(
        output=output, files=[output.name], tensors=len(checkpoint), tensors_changed=len(plan.ops),
        bytes_written=output.stat().st_size, seconds=time.perf_counter() - started,
        adapters=[str(a.path) for a in loaded], weights=weights,
        notes=plan.notes + _skipped_note({None: plan}) + notes + _rounding_notes(figures),
        layout=layout.describe(), skipped=list(plan.skipped), rounding=figures,
    )


def _skipped_note(plans: dict[str | None, MergePlan]) -> list[str]:
    skipped = [name for plan in plans.values() for name in plan.skipped]
    if not skipped:
        return []
    return [f"--skip-missing: {len(skipped)} module(s) the base does not have were left out: {summarize(skipped, 3)}"]


def _streamable(checkpoint: Checkpoint, name: str, ops: list) -> bool:
    """Factored updates (LoRA, LoCon), bare casts and replacements (modules_to_save, PEFT's saved
    embedding `base_layer`) are row-local, so they can stream in row chunks; DoRA (norms of the whole
    update), modules without factors (dense ΔW) and pickle bases go whole. A new kind of op must be added here (and to `_term`)
    before it can stream."""
    info = checkpoint[name]
    if checkpoint.pickled is not None or not info.shape or not info.shape[0] or not checkpoint.row_bytes(name):
        return False
    if ops and type(ops[0]) is ReplaceOp:
        ops = ops[1:]
    return _all_terms(ops)


def _all_terms(ops: list) -> bool:
    """Whether every op is a `_term` (alpha·left@right from a row on): a bias, or a factored update."""
    return all(type(op) is BiasOp or (type(op) is DeltaOp and op.module.streams) for op in ops)


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


def _progress_over(progress: ProgressCallback | None, total: int) -> ProgressCallback | None:
    """One progress bar over every component of a pipeline."""
    if progress is None:
        return None
    return lambda done, _component_total: progress(done, total)


def _copy_component_extras(folder: Path, target: Path) -> None:
    """A merged component's other files (configs and the like) that the writer did not produce: regular
    files (symlinks followed, as in a Hugging Face cache snapshot), each copied up to the size its stat
    gives. Subfolders are left out, as they always were; a FIFO, device, socket or broken symlink is
    refused (`copy_regular`), never read."""
    for entry in sorted(folder.iterdir()):
        if entry.name.endswith((".safetensors", ".index.json")) or (target / entry.name).exists() or \
                entry.is_dir():
            continue
        copy_regular(entry, target / entry.name)


def _copy_pipeline_files(base: Path, temp: Path, merged: set[str | None]) -> None:
    """Everything of a pipeline folder except the components being merged, as it is: regular files and
    folders, symlinks followed; a FIFO, device, socket, broken symlink or symlink loop anywhere in it is
    refused with one line naming it (`copy_regular`), and no file is read past the size its stat gave."""
    for entry in sorted(base.iterdir()):
        if entry.name in merged:
            continue
        copy_regular(entry, temp / entry.name)


def _write(checkpoint: Checkpoint, plan: MergePlan, layout: dict[str, list[PlannedTensor]], temp: Path,
           device: torch.device, allow_nonfinite: bool, progress: ProgressCallback | None,
           figures: list[RoundingFigure] | None = None) -> int:
    """Stream every output tensor, in file order: untouched ones copied byte for byte by the writer
    thread; plain LoRA targets and replacements read, updated and written in row chunks through a
    fixed pool of buffers (reader thread → arithmetic here → writer thread); DoRA targets whole;
    float8 targets requantized (`merge_quant.py`), their rounding figures appended to `figures`."""
    total = sum(item.nbytes for items in layout.values() for item in items)
    kinds: dict[str, str] = {}
    requests: list[tuple[str, int | None, int | None]] = []
    for items in layout.values():
        for item in items:
            kinds[item.name] = kind = _kind(checkpoint, item, plan.ops.get(item.name) or [])
            if kind == "stream":
                requests += [(item.name, start, stop) for start, stop in _row_chunks(checkpoint, item.name)]
            elif kind == "whole":
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
            writer = SafetensorsWriter(temp / file_name if file_name else temp, items,
                                       _file_metadata(checkpoint, items))
            for item in items:
                source, kind = checkpoint.tensors.get(item.name), kinds[item.name]
                ops = plan.ops.get(item.name)
                if kind == "copy":
                    background.submit(partial(writer.copy_raw, item.name, checkpoint.fd(source.path), source))
                elif kind == "parts":
                    for part in source.encoding.parts:
                        background.submit(partial(writer.copy_raw, part.name, checkpoint.fd(part.path), part))
                elif kind == "marker":
                    _write_marker(checkpoint, item, writer, background)
                elif kind == "fp8":
                    figure = _write_fp8(checkpoint, item.name, ops or [], writer, background, device, allow_nonfinite,
                                        threads)
                    if figure is not None and figures is not None:
                        figures.append(figure)
                elif kind == "stream":
                    _stream_tensor(item, ops or [], reader, background, writer, pool, device, scratch,
                                   check=bool(ops) and not allow_nonfinite)
                elif kind == "whole":
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


def _kind(checkpoint: Checkpoint, item: PlannedTensor, ops: list) -> str:
    """How one planned output tensor is produced (see `_write`)."""
    info = checkpoint.tensors.get(item.name)
    if info is None:
        return "marker" if is_marker(item.name) else "part"
    encoding = info.encoding
    if encoding is not None and item.dtype == encoding.data.torch_dtype:
        return "fp8" if ops else "parts"
    if encoding is None and item.dtype in STORAGE_DTYPES.values() and info.torch_dtype != item.dtype:
        return "fp8"
    if not ops and checkpoint.pickled is None and encoding is None and info.torch_dtype == item.dtype:
        return "copy"
    return "stream" if _streamable(checkpoint, item.name, ops) else "whole"


def _write_fp8(checkpoint: Checkpoint, name: str, ops: list, writer: SafetensorsWriter,
               background: BackgroundWriter, device: torch.device, allow_nonfinite: bool,
               threads: int) -> RoundingFigure | None:
    """A float8 tensor with fresh scales: its values, its scale, then its riders copied as they are.
    Requantizing is bound by arithmetic, not I/O, so it runs on all `threads` while the I/O threads wait."""
    info = checkpoint[name]
    terms = [_term(op, device) for op in ops] if _all_terms(ops) else None
    streaming_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, scale, figure = requantize(
            checkpoint, name, Fp8Target.of(info), terms,
            lambda base: _merged_tensor(base, name, ops, device, COMPUTE_DTYPE)[0], device, allow_nonfinite)
    finally:
        torch.set_num_threads(streaming_threads)
    background.submit(partial(writer.write, name, values))
    encoding = info.encoding
    if scale is not None:
        scale_name = encoding.scale.name if encoding is not None else name.removesuffix("weight") + NEW_FP8.scale_name
        background.submit(partial(writer.write, scale_name, scale))
    for part in encoding.extras if encoding is not None else ():
        background.submit(partial(writer.copy_raw, part.name, checkpoint.fd(part.path), part))
    return figure


def _write_marker(checkpoint: Checkpoint, item: PlannedTensor, writer: SafetensorsWriter,
                  background: BackgroundWriter) -> None:
    marker = next((m for m in checkpoint.markers if m.name == item.name), None)
    if marker is not None:
        background.submit(partial(writer.copy_raw, item.name, checkpoint.fd(marker.path), marker))
    else:
        background.submit(partial(writer.write, item.name, torch.empty(item.shape, dtype=item.dtype)))


def _file_metadata(checkpoint: Checkpoint, items: list[PlannedTensor]) -> dict[str, str] | None:
    """The `__metadata__` of the base file this output file's tensors come from (when they all come
    from one), kept; ComfyUI's `_quantization_metadata` only while float8 tensors remain."""
    if checkpoint.pickled is not None:
        return None
    physical = checkpoint.physical
    sources = {physical[item.name].path.name for item in items if item.name in physical}
    if len(sources) != 1:
        return None
    metadata = checkpoint.metadata.get(sources.pop())
    if metadata and not any(item.dtype in STORAGE_DTYPES.values() for item in items):
        metadata = {k: v for k, v in metadata.items() if k != QUANT_METADATA}
    return metadata or None


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
            chunk_terms = [(left, right, alpha, offset - row) for left, right, alpha, offset in terms]
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
        copy_regular_file(companion, temp / companion.name)
    if out_dtype is not None and (temp / "config.json").is_file():
        _update_config(temp / "config.json", out_dtype)
