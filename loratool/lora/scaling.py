"""Scaling rules and PEFT's per-module pattern lookup, defined once: every alpha/r, alpha/√r and
"missing alpha" rule in loratool is one of these functions."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_or_rank(alpha: float | None, rank: int) -> float:
    """LyCORIS' and kohya's rule: a missing or zero alpha means alpha = rank (scale 1)."""
    return float(rank) if not alpha else float(alpha)


def plain_alpha(alpha: float, rank: int, use_rslora: bool) -> float:
    """The alpha that gives the same scale without rsLoRA (alpha' = s·r), for formats with no rsLoRA flag."""
    return lora_scale(alpha, rank, use_rslora) * rank if use_rslora else alpha


def llamacpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to B·A (`llama-adapter.h`, `get_scale`): alpha / rank, or 1 when the
    file's alpha is 0 (unset)."""
    return lora_scale(alpha, rank) if alpha else 1.0


def pattern_value(patterns: Mapping[str, T], module_name: str, default: T) -> T:
    """PEFT's `rank_pattern`/`alpha_pattern` rule: each key is a regex matched as `(.*\\.)?(key)$`
    against the module name (without `base_model.model.`); the first key that matches wins."""
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module_name)
        except re.error as e:  # configs are checked where they are read; this guards any other caller
            from ..errors import AdapterError

            raise AdapterError(f"pattern key {key!r} is not a valid regular expression ({e})") from e
        if matched:
            return value
    return default
