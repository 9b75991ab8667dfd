"""The registry of diffusion-transformer families (`dit.DitFamily` tables), in the order detection
tries them: a family whose files also carry another family's markers comes before it. One import and
one line per family."""

from __future__ import annotations

from . import flux
from .dit import DitFamily

FAMILIES: tuple[DitFamily, ...] = (
    flux.FAMILY,
)
