"""The kinds of layer an adapter module acts on."""

from __future__ import annotations

import enum


class LayerKind(str, enum.Enum):
    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"
    #: a 1-D weight (norm layers' `.w_norm`/`.b_norm` diffs in LyCORIS files); no LoRA has this kind.
    NORM = "norm"
