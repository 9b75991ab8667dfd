"""How llama.cpp applies a LoRA adapter, as pure tensor functions.

llama.cpp reads one `adapter.lora.alpha` per file and scales every pair by alpha / rank, taking the
rank from the shape of `lora_b` (`src/llama-adapter.h`, `get_scale`). PEFT's scale can differ per
module (rsLoRA, `alpha_pattern`), so the exact PEFT delta is kept by folding the ratio between the
two scales into `lora_b`. For `llama`-arch models llama.cpp's converter also reorders the rows of
the base q/k weights per head, so the adapter's `lora_b` rows must follow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .algorithms import LoraModule
from .scaling import llamacpp_scale

if TYPE_CHECKING:
    import torch


def shared_alpha(modules: Iterable[LoraModule]) -> float:
    """The one alpha for the file: the most common `scale·rank` among the modules (ties: the first
    seen), so that as many `lora_b` tensors as possible are written without any rescaling. It is
    rounded to float32 here, as the file stores it, so that every ratio is taken against the value
    llama.cpp will read."""
    import torch

    counts = Counter(m.scale * m.rank for m in modules if m.scale != 0)
    alpha = counts.most_common(1)[0][0] if counts else 1.0
    return torch.tensor(alpha, dtype=torch.float32).item()


def scale_ratio(module: LoraModule, alpha: float) -> float:
    """PEFT's scale for `module` over the one llama.cpp will apply with the file's `alpha`."""
    return module.scale / llamacpp_scale(alpha, module.rank)


def folded_factors(module: LoraModule, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) such that llamacpp_scale(alpha, rank)·B·A equals PEFT's scale·B·A.

    The ratio is applied in float64 and rounded once to float32; with a ratio of exactly 1 both
    factors are returned as stored, so `--dtype auto` keeps them bit for bit."""
    ratio = scale_ratio(module, alpha)
    if ratio == 1.0:
        return module.lora_A, module.lora_B
    return module.lora_A, (module.lora_B.double() * ratio).float()


def interleave_rope_rows(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row order for a `llama`-arch q/k projection: per head, HF stores the two rotary
    halves one after the other (rows j and j + d/2 form a pair) while llama.cpp's GGUF stores each
    pair next to each other (rows 2j and 2j + 1). For k, `n_heads` is the KV head count."""
    count = rows.shape[0]
    if count % (2 * n_heads):
        raise ValueError(f"{count} rows do not split into {n_heads} heads of rotary pairs")
    head_dim = count // n_heads
    return rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def deinterleave_rope_rows(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleave_rope_rows`: a GGUF q/k projection's rows back in HF order."""
    count = rows.shape[0]
    if count % (2 * n_heads):
        raise ValueError(f"{count} rows do not split into {n_heads} heads of rotary pairs")
    head_dim = count // n_heads
    return rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
