"""The registry of diffusion-transformer families (`dit.DitFamily` tables), in the order detection
tries them: a family whose files also carry another family's markers comes before it. One import and
one line per family."""

from __future__ import annotations

from . import chroma
from . import flux
from . import flux2
from . import ltx
from . import hidream
from . import hunyuan_video
from . import qwen_image
from . import sd3
from . import wan
from . import z_image
from .dit import DitFamily

FAMILIES: tuple[DitFamily, ...] = (
    chroma.FAMILY,  # carries Flux's markers: before Flux
    hunyuan_video.FAMILY,  # carries Flux's markers (double_blocks, single_transformer_blocks): before Flux
    flux2.FAMILY,  # carries Flux's markers: before Flux
    flux.FAMILY,
    ltx.FAMILY_LTX2,
    ltx.FAMILY,
    hidream.FAMILY,
    qwen_image.FAMILY_21,
    qwen_image.FAMILY,
    sd3.FAMILY,
    wan.FAMILY,
    z_image.LUMINA2,  # adapters: Lumina2's own names before the ones it shares with Z-Image
    z_image.FAMILY,
)
