"""The Stable Diffusion UNet in its two namings: the original LDM (`input_blocks.4.1…`) and diffusers
(`down_blocks.1.attentions.0…`). One table, applied in either direction.

Let L be the resnets per down level. Down level i, layer j < L is `input_blocks.{1+(L+1)i+j}` (`.0`
the resnet, `.1` the attention); `input_blocks.{(L+1)(i+1)}.0.op` is its downsampler. Up level i, layer
j ≤ L is `output_blocks.{(L+1)i+j}`; its upsampler is the block's last child (`.1.conv` without
attention, `.2.conv` with). Resnet leaves are renamed by `RESNET_LEAVES`; attention leaves are the
same on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

#: Top-level modules that map one to one.
FIXED = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
#: LDM resnet leaf -> diffusers resnet leaf.
RESNET_LEAVES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?$")
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
                              r"(?:\.(.*))?$")


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _rename_leaf(rest: str | None, table: dict[str, str]) -> str | None:
    if rest is None:
        return None
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


_INVERSE_LEAVES = {new: old for old, new in RESNET_LEAVES.items()}
_INVERSE_FIXED = {new: old for old, new in FIXED.items()}


def _fixed(path: str, table: dict[str, str], leaves: dict[str, str]) -> str | None:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            rest = path[len(old) + 1:] or None
            if "resnets" in old + new:
                rest = _rename_leaf(rest, leaves)
            return _join(new, rest)
    return None


def ldm_to_diffusers(path: str, per_level: int) -> str | None:
    """The diffusers module path for an LDM UNet path (without `model.diffusion_model.`), or None."""
    fixed = _fixed(path, FIXED, RESNET_LEAVES)
    if fixed is not None:
        return fixed
    match = _LDM_BLOCK.match(path)
    if not match:
        return None
    side, number, child, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    step = per_level + 1
    if side == "input_blocks":
        if number == 0:
            return None
        level, layer = divmod(number - 1, step)
        if layer == per_level:
            if child == 0 and rest is not None and (rest == "op" or rest.startswith("op.")):
                return _join(f"down_blocks.{level}.downsamplers.0.conv", rest[3:] or None)
            return None
        if child == 0:
            return _join(f"down_blocks.{level}.resnets.{layer}", _rename_leaf(rest, RESNET_LEAVES))
        if child == 1:
            return _join(f"down_blocks.{level}.attentions.{layer}", rest)
        return None
    level, layer = divmod(number, step)
    if child == 0:
        return _join(f"up_blocks.{level}.resnets.{layer}", _rename_leaf(rest, RESNET_LEAVES))
    if rest is not None and (rest == "conv" or rest.startswith("conv.")) and child in (1, 2):
        return _join(f"up_blocks.{level}.upsamplers.0.conv", rest[5:] or None)
    if child == 1:
        return _join(f"up_blocks.{level}.attentions.{layer}", rest)
    return None


def diffusers_to_ldm(path: str, per_level: int, up_level_has_attention: Callable[[int], bool]) -> str | None:
    """The LDM path for a diffusers UNet module path, or None. Where an up level's upsampler sits
    (`.1.conv` or `.2.conv`) depends on whether that level has attention, which only the base knows."""
    fixed = _fixed(path, _INVERSE_FIXED, _INVERSE_LEAVES)
    if fixed is not None:
        return fixed
    match = _DIFFUSERS_BLOCK.match(path)
    if not match:
        return None
    side, level, kind, index, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), \
        match.group(5)
    step = per_level + 1
    if side == "down_blocks":
        if kind == "resnets":
            return _join(f"input_blocks.{1 + step * level + index}.0", _rename_leaf(rest, _INVERSE_LEAVES))
        if kind == "attentions":
            return _join(f"input_blocks.{1 + step * level + index}.1", rest)
        if kind == "downsamplers" and rest is not None and (rest == "conv" or rest.startswith("conv.")):
            return _join(f"input_blocks.{step * (level + 1)}.0.op", rest[5:] or None)
        return None
    if kind == "resnets":
        return _join(f"output_blocks.{step * level + index}.0", _rename_leaf(rest, _INVERSE_LEAVES))
    if kind == "attentions":
        return _join(f"output_blocks.{step * level + index}.1", rest)
    if kind == "upsamplers" and rest is not None and (rest == "conv" or rest.startswith("conv.")):
        child = 2 if up_level_has_attention(level) else 1
        return _join(f"output_blocks.{step * level + per_level}.{child}.conv", rest[5:] or None)
    return None


def ldm_per_level(paths: Iterable[str]) -> int:
    """Resnets per down level of an LDM UNet, from where its first downsampler sits."""
    numbers = [int(m.group(1)) for p in paths if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\b", p))]
    return min(numbers) - 1 if numbers else 2


def diffusers_per_level(paths: Iterable[str]) -> int:
    numbers = [int(m.group(1)) for p in paths if (m := re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", p))]
    return max(numbers) + 1 if numbers else 2


def up_levels_with_attention(paths: Iterable[str]) -> set[int]:
    return {int(m.group(1)) for p in paths if (m := re.match(r"^up_blocks\.(\d+)\.attentions\.", p))}
