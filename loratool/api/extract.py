"""`extract`: the adapter (and optionally the clean base) out of a whole checkpoint that still holds
its LoRA tensors: a loralib state dict or a PEFT-wrapped model's state dict."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.output import atomic_output, check_output_path, copy_regular_file
from ..checkpoint.writer import PlannedTensor, SafetensorsWriter, write_index
from ..errors import AdapterError, MismatchError, UsageError
from ..formats import EMBEDDED
from ..formats.adapters import detect_format, load_adapter, peft_config_for
from ..formats.names import modules_of
from ..formats.peft import write_peft_adapter
from ..formats.peft_state import clean_base_name
from ..lora.delta import COMPUTE_DTYPE
from ..lora.module import Adapter
from ..lora.targeting import compact_target_modules


@dataclass
class ExtractResult:
    output: Path
    base_output: Path | None
    source_format: str
    modules: int
    ranks: list[int]
    alpha: float | None
    merged: bool | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"output": str(self.output), "base_output": str(self.base_output) if self.base_output else None,
                "format": self.source_format, "modules": self.modules, "ranks": self.ranks, "alpha": self.alpha,
                "weights_had_delta_merged": self.merged, "notes": self.notes}


def _transposed(module, weight_shape) -> bool:
    """Whether the checkpoint stores the weight as (in, out) (loralib's fan_in_fan_out)."""
    options = module.orientations(weight_shape)
    if not options:
        raise MismatchError(f"{module.name}: the LoRA update fits {list(module.expected_base_shape())}, but the "
                            f"checkpoint's weight is {list(weight_shape)}")
    return options[0]


def _delta(module, weight_shape) -> torch.Tensor:
    """ΔW in the stored weight's layout."""
    return module.delta(COMPUTE_DTYPE, "cpu", _transposed(module, weight_shape))


def detect_merged(checkpoint: Checkpoint, adapter: Adapter, base: Checkpoint) -> bool:
    """Whether the checkpoint's weights already include ΔW (saved after loralib's `eval()` merged it):
    W is compared with W_base and with W_base + ΔW; the nearer one wins, over all modules together."""
    nearer_merged = nearer_plain = 0.0
    for name, module in adapter.modules.items():
        key = f"{name}.weight"
        if key not in base:
            raise AdapterError(f"--base has no {key}, so it is not this model's base")
        weight = checkpoint.read(key).to(COMPUTE_DTYPE)
        plain = base.read(key).to(COMPUTE_DTYPE)
        delta = _delta(module, weight.shape)
        nearer_plain += float(torch.linalg.vector_norm(weight - plain)) ** 2
        nearer_merged += float(torch.linalg.vector_norm(weight - plain - delta)) ** 2
    return nearer_merged < nearer_plain


def extract(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    base_output: str | os.PathLike | None = None,
    format: str | None = None,
    alpha: float | None = None,
    already_merged: bool | None = None,
    base: str | os.PathLike | None = None,
    force: bool = False,
    allow_pickle: bool = False,
) -> ExtractResult:
    """Write the LoRA held inside `checkpoint` as a PEFT adapter, and with `base_output` the clean base:
    LoRA tensors dropped, `base_layer.`/`original_module.` names restored, merged loralib weights unmerged."""
    checkpoint, output = Path(checkpoint), Path(output)
    base_output = Path(base_output) if base_output is not None else None
    if not Path(checkpoint).exists():
        raise UsageError(f"{checkpoint}: no such file or folder")
    fmt = format or detect_format(checkpoint, allow_pickle)
    if fmt not in EMBEDDED:
        what = f"a {fmt} adapter" if fmt else "not a checkpoint with LoRA tensors inside"
        raise UsageError(f"{checkpoint} is {what}; extract reads {' and '.join(EMBEDDED)} checkpoints (use convert "
                         "for adapter files)")
    adapter = load_adapter(checkpoint, format=fmt, allow_pickle=allow_pickle, alpha=alpha)
    inputs = [checkpoint] + ([Path(base)] if base is not None else [])
    check_output_path(output, inputs, force)
    if base_output is not None:
        check_output_path(base_output, inputs + [output], force)
    notes: list[str] = []
    with open_checkpoint(checkpoint, allow_pickle=allow_pickle) as source:
        merged = None
        if fmt == "loralib" and base_output is not None:
            merged = _merged_status(source, adapter, already_merged, base, allow_pickle, notes)
        config = _config(adapter, source)
        with atomic_output(output, is_folder=True) as temp:
            write_peft_adapter(temp, adapter.modules, adapter.full_tensors, config)
        if base_output is not None:
            _write_clean_base(source, adapter, fmt, base_output, bool(merged))
    return ExtractResult(output, base_output, fmt, len(adapter.modules), sorted({m.rank for m in adapter.modules.values()}),
                         adapter.config.get("lora_alpha"), merged, notes)


def _merged_status(source: Checkpoint, adapter: Adapter, already_merged: bool | None, base, allow_pickle: bool,
                   notes: list[str]) -> bool:
    if already_merged is not None:
        return already_merged
    if base is not None:
        with open_checkpoint(base, allow_pickle=allow_pickle) as base_ckpt:
            merged = detect_merged(source, adapter, base_ckpt)
        notes.append(f"compared with --base: the weights {'already include' if merged else 'do not include'} ΔW")
        return merged
    notes.append("cannot tell whether this loralib checkpoint was saved after eval() merged ΔW into the weights; "
                 "assumed not (saved in train mode). Pass --already-merged, or --base to detect it")
    return False


def _config(adapter: Adapter, source: Checkpoint) -> dict:
    config = peft_config_for(adapter)
    if adapter.source_format == "loralib":
        candidates = modules_of(clean_base_name(k) or "" for k in source)
        config["target_modules"] = compact_target_modules(adapter.modules, candidates)
        config["fan_in_fan_out"] = any(_transposed(m, source[f"{n}.weight"].shape) for n, m in adapter.modules.items())
    model_config = source.config() or {}
    config.setdefault("base_model_name_or_path", model_config.get("_name_or_path") or None)
    return config


def _clean_name(key: str, fmt: str) -> str | None:
    if fmt == "loralib":
        return None if key.endswith((".lora_A", ".lora_B")) else key
    return clean_base_name(key)


def _write_clean_base(source: Checkpoint, adapter: Adapter, fmt: str, output: Path, merged: bool) -> None:
    """Stream the base out with the input's file layout, one tensor at a time."""
    layout: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(source, key=lambda k: (source[k].path.name, source[k].data_start)):
        clean = _clean_name(key, fmt)
        if clean is not None:
            layout.setdefault(source[key].path.name if source.is_folder else "", []).append((key, clean))
    unmerge = {f"{n}.weight": m for n, m in adapter.modules.items()} if merged else {}
    with atomic_output(output, is_folder=source.is_folder) as temp:
        planned_layout = {}
        for file_name, items in layout.items():
            plan = [PlannedTensor(clean, source[key].torch_dtype, source[key].shape) for key, clean in items]
            planned_layout[file_name] = plan
            writer = SafetensorsWriter(temp / file_name if file_name else temp, plan)
            try:
                for key, clean in items:
                    if clean in unmerge:
                        module = unmerge[clean]
                        weight = source.read(key)
                        delta = _delta(module, weight.shape)
                        writer.write(clean, (weight.to(COMPUTE_DTYPE) - delta).to(weight.dtype))
                    elif source.pickled is None:
                        writer.copy_raw(clean, source.fd(source[key].path), source[key])
                    else:
                        writer.write(clean, source.read(key))
                writer.finish()
            finally:
                writer.close()
        if source.is_folder:
            if len(layout) > 1 or source.index_path is not None:
                write_index(temp / "model.safetensors.index.json", planned_layout)
            for companion in source.companion_files():
                copy_regular_file(companion, temp / companion.name)
