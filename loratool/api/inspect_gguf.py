"""`inspect` for `.gguf` files: llama.cpp LoRA adapters (architecture, alpha, ranks, targets, dtypes)
and, more briefly, GGUF models. The keys follow the adapter and checkpoint schemas of docs/inspect.md
where they mean the same thing."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from ..errors import InvalidCheckpointError
from ..formats.gguf import LORA_A, LORA_B
from ..gguf_file import GgufFile, read_gguf
from ..lora.scaling import llamacpp_scale

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_EMBEDDING = "token_embd"
ALPHA_KEY = "adapter.lora.alpha"


def _dtypes(infos) -> dict[str, dict[str, int]]:
    breakdown: dict[str, dict[str, int]] = {}
    for info in infos:
        entry = breakdown.setdefault(info.type, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += info.numel
        entry["bytes"] += info.nbytes
    return dict(sorted(breakdown.items()))


def _target(base_name: str) -> tuple[int | None, str]:
    """(layer, target) for a GGUF base tensor name: `blk.3.attn_q.weight` -> (3, 'attn_q')."""
    stem = base_name.removesuffix(".weight")
    match = _BLOCK.match(stem)
    return (int(match.group(1)), match.group(2)) if match else (None, stem)


def inspect_gguf(path: str | Path, check: bool = False, tensors: bool = False, schema: int = 1) -> dict:
    gguf_file = read_gguf(path)
    metadata = gguf_file.metadata
    infos = list(gguf_file.tensors.values())
    report: dict = {
        "schema": schema,
        "kind": "adapter" if metadata.get("general.type") == "adapter" else "checkpoint",
        "path": str(gguf_file.path),
        "format": "gguf",
        "architecture": metadata.get("general.architecture"),
        "name": metadata.get("general.name"),
    }
    if report["kind"] == "adapter":
        report.update(_adapter_keys(gguf_file))
    else:
        report.update(_model_keys(gguf_file))
    report.update({
        "tensors": len(infos),
        "parameters": sum(i.numel for i in infos),
        "bytes": sum(i.nbytes for i in infos),
        "dtypes": _dtypes(infos),
        "metadata": {gguf_file.path.name: metadata},
    })
    if report["kind"] == "checkpoint":
        # the type mix is `dtypes` (GGML types); one number for how compressed the model is
        report["bytes_per_parameter"] = report["bytes"] / report["parameters"] if report["parameters"] else None
    if tensors:
        report["tensor_list"] = [{"name": i.name, "dtype": i.type, "shape": list(i.shape), "bytes": i.nbytes}
                                 for i in sorted(infos, key=lambda i: i.name)]
    if check:
        report["nonfinite"] = _nonfinite(gguf_file)
    return report


def _model_keys(gguf_file: GgufFile) -> dict:
    """A GGUF model: the transformers architecture it was converted from, where loratool reads it by HF
    names (`checkpoint/gguf_base.py`), and llama.cpp's `general.file_type` (MOSTLY_Q4_K_M ...)."""
    from ..gguf_arch import rule_for_gguf_arch
    from ..gguf_file import import_gguf

    gguf = import_gguf()
    architecture = gguf_file.metadata.get("general.architecture")
    found = rule_for_gguf_arch(architecture, gguf) if isinstance(architecture, str) else None
    file_type = gguf_file.metadata.get("general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type).name if isinstance(file_type, int) else None
    except ValueError:
        file_type = str(file_type)
    return {"sharded": False, "files": [gguf_file.path.name], "model_type": architecture if found else None,
            "architectures": [found[0]] if found else None, "embedded_adapter": None, "layout": "gguf",
            "family": architecture, "variant": None, "components": {}, "file_type": file_type}


def _alpha(gguf_file: GgufFile) -> float:
    """`adapter.lora.alpha`, which llama.cpp reads as a float (0 or absent: scale 1); anything but a
    finite number of at least 0 is refused, naming the key."""
    value = gguf_file.metadata.get(ALPHA_KEY)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise InvalidCheckpointError(f"{gguf_file.path}: {ALPHA_KEY} must be a finite number of at least 0 "
                                     f"(llama.cpp reads a float), got {shown}")
    return float(value)


def _adapter_keys(gguf_file: GgufFile) -> dict:
    metadata = gguf_file.metadata
    alpha = _alpha(gguf_file)
    halves_a = {n.removesuffix(LORA_A) for n in gguf_file.tensors if n.endswith(LORA_A)}
    halves_b = {n.removesuffix(LORA_B): info for n, info in gguf_file.tensors.items() if n.endswith(LORA_B)}
    pairs = {name: info for name, info in halves_b.items() if name in halves_a}
    groups: dict[tuple, dict] = {}
    layers, ranks = set(), Counter()
    for base_name, lora_b in sorted(pairs.items()):
        layer, target = _target(base_name)
        if layer is not None:
            layers.add(layer)
        rank = lora_b.shape[-1]
        ranks[rank] += 1
        kind = "embedding" if target == _EMBEDDING else "linear"
        group = groups.setdefault((target, rank), {
            "target": target, "kind": kind, "rank": rank, "alpha": alpha, "scale": llamacpp_scale(alpha, rank),
            "dora": False, "modules": 0, "algorithm": "lora", "tucker": False, "factor": None, "parameters": 0,
        })
        group["modules"] += 1
        group["parameters"] += lora_b.numel + gguf_file.tensors[base_name + LORA_A].numel
    unpaired = sorted(halves_a.symmetric_difference(halves_b))
    base_model = metadata.get("general.base_model.0.repo_url") or metadata.get("general.base_model.0.name")
    return {
        "base_model": base_model,
        "adapter_type": metadata.get("adapter.type"),
        "peft_version": None,
        "task_type": None,
        "r": ranks.most_common(1)[0][0] if ranks else None,
        "lora_alpha": alpha,
        "lora_alpha_known": True,
        "family": None,
        "family_from": None,
        "use_rslora": False,
        "use_dora": False,
        "modules": len(pairs),
        "algorithms": {"lora": len(pairs)} if pairs else {},  # llama.cpp adapters hold LoRA only
        "targets": sorted({g["target"] for g in groups.values()}),
        "layers": sorted(layers),
        "groups": sorted(groups.values(), key=lambda g: (g["target"], g["rank"])),
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": [],
        "unpaired": unpaired,
    }


def _nonfinite(gguf_file: GgufFile) -> dict[str, dict[str, int]]:
    import torch

    found = {}
    for name in gguf_file.tensors:
        values = gguf_file.read(name)
        nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
        if nan or inf:
            found[name] = {"nan": nan, "inf": inf}
    return found
