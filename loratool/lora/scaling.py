"""Scaling rules and PEFT's per-module pattern lookup, defined once."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_value(patterns: Mapping[str, T], module_name: str, default: T) -> T:
    """PEFT's `rank_pattern`/`alpha_pattern` rule: each key is a regex matched as `(.*\\.)?(key)$`
    against the module name (without `base_model.model.`); the first key that matches wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
