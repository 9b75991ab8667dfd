"""`inspect`: describe a checkpoint or an adapter as plain JSON-ready values.

The keys returned here are the documented `--json` schema (docs/inspect.md); renderers only read them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint, open_checkpoint
from ..formats import EMBEDDED
from ..quant import is_opaque
from ..formats.adapters import detect_format, load_adapter
from ..dtypes import code_of
from ..formats.gguf import GGUF_SUFFIX
from ..layouts import KOHYA_PREFIXES, layout_of, open_base
from ..layouts.families import adapter_family
from ..layouts import clip, unet
from ..layouts.dit_families import FAMILIES
from ..layouts.index import flatten
from ..lora.module import Adapter
from ..lora.kinds import LayerKind

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _dtype_breakdown(items) -> dict[str, dict[str, int]]:
    breakdown: dict[str, dict[str, int]] = {}
    for dtype, numel, nbytes in items:
        entry = breakdown.setdefault(dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += numel
        entry["bytes"] += nbytes
    return dict(sorted(breakdown.items()))


@contextlib.contextmanager
def _listing() -> Iterator[None]:
    """Around building the `--tensors` listing: the cyclic garbage collector paused. The listing is one
    dict per tensor and makes no cycles, but each dict counts towards collections that walk every
    object alive, the parsed header's included: 400k entries took 2.7 s with it and 0.2 s without."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _nonfinite(tensor: torch.Tensor) -> dict[str, int] | None:
    import torch

    if not tensor.is_floating_point():
        return None
    values = tensor.float() if tensor.dtype.itemsize < 2 else tensor
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    return {"nan": nan, "inf": inf} if nan or inf else None


def _stored_as(info) -> str:
    """A tensor's dtype, or for a quantized one its encoding ("FP8 e4m3 block 128×128")."""
    return info.encoding.describe() if info.encoding is not None else info.dtype


def inspect_checkpoint(checkpoint: Checkpoint, check: bool = False, tensors: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    infos = list(checkpoint.values())
    config = checkpoint.config() or {}
    report: dict = {
        "schema": SCHEMA_VERSION,
        "kind": "checkpoint",
        "path": str(checkpoint.path),
        "format": "pickle" if checkpoint.pickled is not None else "safetensors",
        "sharded": checkpoint.index_path is not None,
        "files": [p.name for p in checkpoint.files],
        "tensors": len(infos),
        "parameters": sum(i.numel for i in infos),
        "bytes": sum(i.nbytes for i in infos),
        "dtypes": _dtype_breakdown((_stored_as(i), i.numel, i.nbytes) for i in infos),
        "metadata": checkpoint.metadata,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        **layout_of({k: i.shape for k, i in checkpoint.items()}, checkpoint.path, config).describe(),
    }
    forms = Counter(i.encoding.form for i in infos if i.encoding is not None)
    if forms:
        report["quantization"] = {"forms": dict(sorted(forms.items())), "markers": [m.name for m in checkpoint.markers],
                                  "config": config.get("quantization_config")}
    if tensors:
        files = {id(p): p.name for p in {i.path for i in infos}}
        with _listing():
            report["tensor_list"] = [
                {"name": i.name, "dtype": _stored_as(i), "shape": list(i.shape), "bytes": i.nbytes,
                 "file": files[id(i.path)]}
                for i in sorted(infos, key=attrgetter("name"))
            ]
    if check:
        found = {}
        total = report["bytes"]
        for info in infos:
            scale = info.encoding.scale if info.encoding is not None else None
            bad_scale = _nonfinite(checkpoint.read_stored(scale)) if scale is not None else None
            if bad_scale:
                found[scale.name] = bad_scale
            if is_opaque(info):
                continue  # kept as stored, never decoded: its float scale is checked above
            bad = _nonfinite(checkpoint.read(info.name))
            if bad:
                found[info.name] = bad
            if progress:
                progress(info.nbytes, total)
        report["nonfinite"] = found
    return report


_FLAT_BLOCK_INDEX = re.compile(r"_\d+_")

#: Transformer-block leaves of a diffusion UNet (the same in LDM and diffusers names), which no layout
#: table lists because they are never renamed. attn1 is self-attention, attn2 cross-attention.
_ATTENTION_LEAVES = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "downsamplers.0.conv", "upsamplers.0.conv", "conv", "op")


def _diffusion_leaves() -> tuple[str, ...]:
    """Module leaves in the bases' own terms, for naming diffusion adapters' modules: the UNet's
    attention and resnet leaves (both namings), its top-level modules, CLIP's encoder-layer leaves
    (both namings) and every DiT family's leaves (both namings), read off the layout tables."""
    leaves = {*_ATTENTION_LEAVES, *unet.RESNET_LEAVES, *unet.RESNET_LEAVES.values(), *clip.IN_PROJ,
              *clip.RESBLOCK_LEAVES, *clip.RESBLOCK_LEAVES.values()}
    leaves |= {k for k, v in unet.FIXED.items() if not v.startswith("mid_block.")}
    leaves |= {v for v in unet.FIXED.values() if not v.startswith("mid_block.")}
    for family in FAMILIES:
        leaves |= family.leaves()
    return tuple(sorted(leaves, key=lambda leaf: (-len(leaf), leaf)))  # longest first: attn2.to_k before to_k


_DIFFUSION_LEAVES = _diffusion_leaves()


def _base_leaf(name: str) -> str | None:
    """The longest known base leaf that `name` (dotted, or kohya-flattened) ends with, in dotted form:
    `…_transformer_blocks_0_attn2_to_k` -> `attn2.to_k`, `…input_blocks_1_1_proj_in` -> `proj_in`."""
    flat = flatten(name)
    for leaf in _DIFFUSION_LEAVES:
        spelled = flatten(leaf)
        if flat == spelled or flat.endswith("_" + spelled):
            return leaf
    return None


def _leaf(name: str, diffusion: bool = False) -> str:
    """The module's name as a target, in the base's terms where loratool can tell them: for a diffusion
    adapter (and every kohya name) the longest known base leaf it ends with (`attn2.to_k`, `proj_in`,
    `ff.net.0.proj`, `self_attn.q_proj`, `img_attn.qkv`); otherwise the last dotted part (`q_proj`),
    with its parent when that part is a number (`to_out.0`), or for a kohya name no table knows, what
    follows the last block index."""
    if diffusion or "." not in name:
        known = _base_leaf(name)
        if known is not None:
            return known
    if "." in name:
        parent, last = name.rsplit(".", 1)
        return f"{parent.rsplit('.', 1)[-1]}.{last}" if last.isdigit() else last
    tail = _FLAT_BLOCK_INDEX.split(name)[-1]
    if tail != name:
        return tail
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _groups(adapter: Adapter, diffusion: bool) -> list[dict]:
    """One group per (target leaf, kind, rank, alpha, scale, DoRA, algorithm, Tucker, LoKr factor), read
    off each module's `info()`, so every algorithm is described the same way."""
    groups: dict[tuple, dict] = {}
    for name, module in adapter.modules.items():
        leaf = _leaf(name, diffusion)
        info = module.info()
        factor = tuple(info["factor"]) if info["factor"] is not None else None
        key = (leaf, info["kind"], info["rank"], info["alpha"], info["scale"], info["dora"], info["algorithm"],
               info["tucker"], factor)
        group = groups.setdefault(key, {
            "target": leaf, "kind": info["kind"], "rank": info["rank"], "alpha": info["alpha"],
            "scale": info["scale"], "dora": info["dora"], "modules": 0, "algorithm": info["algorithm"],
            "tucker": info["tucker"], "factor": info["factor"], "parameters": 0,
        })
        group["modules"] += 1
        group["parameters"] += info["parameters"]
    missing_last = lambda value: (value is None, value if value is not None else 0)  # noqa: E731
    return sorted(groups.values(), key=lambda g: (g["target"], missing_last(g["rank"]), missing_last(g["alpha"]),
                                                  g["algorithm"], g["tucker"], g["factor"] or []))


def _algorithms(adapter: Adapter) -> dict[str, int]:
    """Algorithm name (lora, locon, loha, lokr, full) -> number of modules."""
    counts: dict[str, int] = {}
    for module in adapter.modules.values():
        counts[module.algorithm] = counts.get(module.algorithm, 0) + 1
    return dict(sorted(counts.items()))


def _uniform(groups: list[dict], key: str):
    """The value every module shares (full diffs, which have none, aside), or None."""
    values = {g[key] for g in groups if g[key] is not None}
    return values.pop() if len(values) == 1 else None


def inspect_adapter(adapter: Adapter, check: bool = False, tensors: bool = False) -> dict:
    named = adapter.named_tensors()
    layers = sorted({int(m.group(1)) for name in adapter.modules if (m := _LAYER_INDEX.search(f".{name}."))})
    config = adapter.config
    family, family_from = adapter_family(
        list(adapter.modules), {n: shape[1] for n, m in adapter.modules.items()
                                if m.kind is not LayerKind.EMBEDDING and len(shape := m.expected_base_shape()) >= 2},
        config.get("kohya_metadata") or config.get("metadata") or {})
    diffusion = family is not None or adapter.source_format in ("kohya", "diffusers")
    groups = _groups(adapter, diffusion)
    alpha_known = not config.get("alpha_unknown", False)
    alpha = config.get("lora_alpha", config.get("alpha"))  # PEFT LoHa/LoKr configs call it alpha
    report: dict = {
        "schema": SCHEMA_VERSION,
        "kind": "adapter",
        "path": str(adapter.path),
        "format": adapter.source_format,
        "base_model": adapter.base_model,
        "peft_version": config.get("peft_version"),
        "task_type": config.get("task_type"),
        # The config's defaults; without a config (kohya, diffusers files), the value every module shares.
        "r": config["r"] if config.get("r") is not None else _uniform(groups, "rank"),
        "lora_alpha": alpha if alpha is not None or not alpha_known else _uniform(groups, "alpha"),
        "lora_alpha_known": alpha_known,
        "family": family,
        "family_from": family_from,
        "use_rslora": adapter.use_rslora,
        "use_dora": adapter.use_dora,
        "modules": len(adapter.modules),
        "algorithms": _algorithms(adapter),
        "targets": sorted({_leaf(name, diffusion) for name in adapter.modules}),
        "layers": layers,
        "groups": groups,
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "modules_to_save": sorted(adapter.full_tensors),
        "tensors": len(named),
        "parameters": sum(t.numel() for t in named.values()),
        "bytes": sum(t.numel() * t.element_size() for t in named.values()),
        "dtypes": _dtype_breakdown(
            (code_of(t), t.numel(), t.numel() * t.element_size()) for t in named.values()
        ),
    }
    if tensors:
        with _listing():
            report["tensor_list"] = [
                {"name": name, "dtype": code_of(t), "shape": list(t.shape),
                 "bytes": t.numel() * t.element_size()}
                for name, t in sorted(named.items())
            ]
    if check:
        report["nonfinite"] = {name: bad for name, t in named.items() if (bad := _nonfinite(t))}
    return report


def inspect(path: str | os.PathLike, check: bool = False, tensors: bool = False, allow_pickle: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Describe `path`: an adapter when one is recognised there, otherwise a model checkpoint."""
    path = Path(path)
    if path.suffix == GGUF_SUFFIX and path.is_file():
        from .inspect_gguf import inspect_gguf

        return inspect_gguf(path, check=check, tensors=tensors, schema=SCHEMA_VERSION)
    fmt = detect_format(path, allow_pickle)
    if fmt is not None and fmt not in EMBEDDED:
        return inspect_adapter(load_adapter(path, format=fmt, allow_pickle=allow_pickle, need_alpha=False,
                                           header_only=not check), check=check,
                              tensors=tensors)
    if path.is_dir() and (path / "model_index.json").is_file():
        return inspect_pipeline(path, check=check, tensors=tensors, allow_pickle=allow_pickle, progress=progress)
    with open_checkpoint(path, allow_pickle=allow_pickle) as checkpoint:
        report = inspect_checkpoint(checkpoint, check=check, tensors=tensors, progress=progress)
    report["embedded_adapter"] = fmt
    return report


def _sum_breakdowns(breakdowns) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for breakdown in breakdowns:
        for dtype, entry in breakdown.items():
            into = total.setdefault(dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
            for key in into:
                into[key] += entry[key]
    return dict(sorted(total.items()))


def inspect_pipeline(path: Path, check: bool = False, tensors: bool = False, allow_pickle: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """A diffusers pipeline folder: the checkpoint schema over all its LoRA-adaptable components, with
    file and tensor names qualified by component (`unet/diffusion_pytorch_model.safetensors`)."""
    layout, checkpoints = open_base(path, allow_pickle=allow_pickle)
    try:
        parts = {name: inspect_checkpoint(c, check=check, tensors=tensors, progress=progress)
                 for name, c in checkpoints.items()}
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()
    report = {"schema": SCHEMA_VERSION, "kind": "checkpoint", "path": str(path), "format": "safetensors",
              "sharded": any(p["sharded"] for p in parts.values()),
              "files": [f"{name}/{f}" for name, p in parts.items() for f in p["files"]],
              "tensors": sum(p["tensors"] for p in parts.values()),
              "parameters": sum(p["parameters"] for p in parts.values()),
              "bytes": sum(p["bytes"] for p in parts.values()),
              "dtypes": _sum_breakdowns(p["dtypes"] for p in parts.values()),
              "metadata": {f"{name}/{f}": m for name, p in parts.items() for f, m in p["metadata"].items()},
              "model_type": None, "architectures": None, **layout.describe(), "embedded_adapter": None}
    if tensors:
        with _listing():
            report["tensor_list"] = [{**t, "name": f"{name}/{t['name']}", "file": f"{name}/{t['file']}"}
                                     for name, p in parts.items() for t in p["tensor_list"]]
    if check:
        report["nonfinite"] = {f"{name}/{t}": bad for name, p in parts.items() for t, bad in p["nonfinite"].items()}
    return report
