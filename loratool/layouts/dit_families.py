"""The registry of diffusion-transformer families (`dit.DitFamily` tables), in the order detection
tries them: a family whose markers another family's files also have comes first."""

from __future__ import annotations

from . import flux
from .dit import DitFamily

FAMILIES: tuple[DitFamily, ...] = (flux.FAMILY,)
