"""Pipeline components in adapter module names (`unet.down_blocks…`, `text_encoder.…`)."""

from __future__ import annotations

from collections.abc import Iterable

from ..layouts import DIFFUSION_COMPONENTS as COMPONENTS

WEIGHT_SUFFIX = ".weight"


def split_component(name: str) -> tuple[str | None, str]:
    """('unet', 'down_blocks.0...') for a component-prefixed name; (None, name) otherwise."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (None, name)


def components_of(names: Iterable[str]) -> list[str | None]:
    return sorted({split_component(n)[0] for n in names}, key=lambda c: (c is not None, c or ""))


def modules_of(keys: Iterable[str]) -> set[str]:
    """Module paths that own a `.weight` tensor."""
    return {k[: -len(WEIGHT_SUFFIX)] for k in keys if k.endswith(WEIGHT_SUFFIX)}
