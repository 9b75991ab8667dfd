"""microsoft/LoRA (`loralib`) checkpoints: a whole model's `state_dict()` in which every LoRA layer
holds `<module>.lora_A` (r × in, or r × vocab) and `<module>.lora_B` (out × r, or dim × r) beside its
`<module>.weight`.

loralib does not store `lora_alpha` (its default is 1), so it must come from `--alpha` or a
`lora_alpha` entry in the checkpoint folder's `config.json`. `MergedLinear` (grouped q/k/v with
`enable_lora`) and `ConvLoRA` factorise layouts PEFT cannot express and are refused by name.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import AdapterError, summarize
from ..lora.module import Adapter
from ..lora.kinds import LayerKind
from ..lora.algorithms import LoraModule
from ..lora.targeting import EMBEDDING_LEAVES, leaf
from . import ReadOptions

A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"


def looks_like(keys: list[str]) -> bool:
    key_set = set(keys)
    return any(k.endswith(A_SUFFIX) and f"{k[: -len(A_SUFFIX)]}.weight" in key_set for k in keys)


def _alpha(path: Path, checkpoint: Checkpoint, alpha: float | None) -> float:
    if alpha is not None:
        return float(alpha)
    config = checkpoint.config() or {}
    if isinstance(config.get("lora_alpha"), (int, float)):
        return float(config["lora_alpha"])
    raise AdapterError(
        f"{path}: loralib checkpoints do not store lora_alpha, and no config.json beside it has one; pass --alpha "
        "with the value used in training (loralib's default is 1, so the scale is 1/r)"
    )


def read(path: Path, options: ReadOptions) -> Adapter:
    with open_checkpoint(path, allow_pickle=options.allow_pickle, quantized=False) as checkpoint:
        scale_alpha = _alpha(path, checkpoint, options.alpha)
        problems, modules = [], {}
        for key in sorted(k for k in checkpoint if k.endswith(A_SUFFIX)):
            name = key[: -len(A_SUFFIX)]
            weight_key = f"{name}.weight"
            if f"{name}{B_SUFFIX}" not in checkpoint or weight_key not in checkpoint:
                problems.append(f"{name} has lora_A but no {'lora_B' if weight_key in checkpoint else 'weight'}")
                continue
            A, B = checkpoint.read(key), checkpoint.read(f"{name}{B_SUFFIX}")
            weight_shape = tuple(checkpoint[weight_key].shape)
            kind = _kind(name, A.shape, B.shape, weight_shape)
            if kind is None:
                problems.append(
                    f"{name}: lora_A {list(A.shape)}, lora_B {list(B.shape)} and weight {list(weight_shape)} are not a "
                    "loralib Linear or Embedding (MergedLinear and ConvLoRA layouts cannot be expressed as PEFT LoRA)"
                )
                continue
            modules[name] = LoraModule(name=name, kind=kind, lora_A=A, lora_B=B, alpha=scale_alpha)
    if problems:
        raise AdapterError(f"{path}: {summarize(problems)}")
    if not modules:
        raise AdapterError(f"{path}: holds no loralib LoRA tensors")
    return Adapter(path=path, source_format="loralib", modules=modules, config={"lora_alpha": scale_alpha})


def _kind(name: str, a_shape, b_shape, weight_shape) -> LayerKind | None:
    """Linear weights are (out, in), or (in, out) with loralib's fan_in_fan_out; embeddings are
    (vocab, dim), the same shape as the latter, so the module name tells them apart."""
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or len(weight_shape) != 2:
        return None
    transposed = (a_shape[1], b_shape[0])
    if weight_shape == transposed and (leaf(name) in EMBEDDING_LEAVES or "embed" in leaf(name)):
        return LayerKind.EMBEDDING
    return LayerKind.LINEAR if weight_shape in {(b_shape[0], a_shape[1]), transposed} else None
