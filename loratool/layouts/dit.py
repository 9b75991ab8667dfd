"""Diffusion transformers (DiTs) in their two namings: the model's own ("native", as its authors and
ComfyUI save single files) and diffusers'. One declarative table per family (`flux.py`, …), read in
both directions by one builder pair (`build.dit_native`, `build.dit_diffusers`), registered in
`dit_families.FAMILIES`. A new family is one table module and one line there.

A native module may fuse several diffusers modules by rows (Flux's `qkv` is [to_q; to_k; to_v]): its
table lists the diffusers leaves in row order, and `fused_rows` says how many rows each takes. A module
whose two row halves are ordered the other way round in one naming is listed in `swapped_halves`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


class KeyIndex:
    """A checkpoint's tensor names, sorted once, answering "does any name start with P" in O(log n): a
    header of 400k tensors is matched against every family's markers."""

    def __init__(self, keys: Iterable[str]):
        self.keys = sorted(keys)

    def has_prefix(self, prefix: str) -> bool:
        i = bisect.bisect_left(self.keys, prefix)
        return i < len(self.keys) and self.keys[i].startswith(prefix)


def equal_rows(native: str, rows: int, width: int, parts: int) -> list[int]:
    """The usual fusion: `parts` modules of equal height stacked by rows."""
    return [rows // parts] * parts


@dataclass(frozen=True)
class Block:
    """A repeated block: `<native>.N.<leaf>` holds the diffusers modules `<diffusers>.N.<part>`."""

    native: str
    diffusers: str
    #: native leaf -> diffusers leaves, in row order (several: a fused tensor).
    leaves: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class DitFamily:
    name: str
    #: Layout names for the two namings (`inspect` reports them).
    native_layout: str
    diffusers_layout: str
    blocks: tuple[Block, ...]
    #: Top-level native module -> diffusers module.
    top_level: Mapping[str, str]
    #: Key prefixes every native file has (after any ComfyUI prefix), and every diffusers file has.
    native_markers: tuple[str, ...]
    diffusers_markers: tuple[str, ...]
    #: Modules (in either naming) whose two row halves are swapped between the namings.
    swapped_halves: frozenset[str] = frozenset()
    #: More such modules, named from a file's shapes in either naming (SD3's last context block).
    shape_swapped_halves: Callable[[Mapping[str, tuple[int, ...]]], frozenset[str]] = field(
        default=lambda shapes: frozenset())
    #: The native name of normalisation weights, when not `weight` (BFL's RMSNorm `scale`).
    norm_param: str = "weight"
    #: Row counts of a fused native tensor's parts: (native path, rows, width, parts) -> sizes.
    fused_rows: Callable[[str, int, int, int], list[int]] = equal_rows
    #: What `inspect` calls the file beyond the family (a size, a task), from its native or diffusers
    #: shapes (after any saver's prefix).
    variant: Callable[[Mapping[str, tuple[int, ...]]], str | None] = field(default=lambda shapes: None)
    #: Lower-case prefixes of `ss_base_model_version` / `modelspec.architecture` values naming the family.
    metadata_prefixes: tuple[str, ...] = ()
    #: A regex that finds the family in an adapter's module names (any dialect, dotted or flattened).
    adapter_names: str | None = None

    def swapped(self, shapes: Mapping[str, tuple[int, ...]]) -> frozenset[str]:
        """Every module (either naming) whose row halves are swapped between the namings, in this file."""
        return self.swapped_halves | self.shape_swapped_halves(shapes)

    def is_native(self, index: KeyIndex) -> bool:
        return all(index.has_prefix(m) for m in self.native_markers)

    def is_diffusers(self, index: KeyIndex) -> bool:
        return all(index.has_prefix(m) for m in self.diffusers_markers)

    def native_to_diffusers(self, path: str) -> tuple[str, ...] | None:
        """The diffusers modules (in row order) a native module path holds, or None if the table has none."""
        if path in self.top_level:
            return (self.top_level[path],)
        for block in self.blocks:  # a block's name may be dotted (`distilled_guidance_layer.layers`)
            if not path.startswith(block.native + "."):
                continue
            number, _, leaf = path[len(block.native) + 1:].partition(".")
            if number.isdigit() and leaf in block.leaves:
                return tuple(f"{block.diffusers}.{number}.{part}" for part in block.leaves[leaf])
        return None

    def diffusers_groups(self, paths: set[str]) -> dict[str, tuple[str, ...]]:
        """Native module path -> the diffusers modules it stacks, for each group whose parts all exist."""
        groups: dict[str, tuple[str, ...]] = {}
        for native, diffusers in self.top_level.items():
            if diffusers in paths:
                groups[native] = (diffusers,)
        for block in self.blocks:
            numbers = {path[len(block.diffusers) + 1:].split(".")[0] for path in paths
                       if path.startswith(block.diffusers + ".")}
            for number in numbers:
                for leaf, parts in block.leaves.items():
                    names = tuple(f"{block.diffusers}.{number}.{part}" for part in parts)
                    if all(name in paths for name in names):
                        groups[f"{block.native}.{number}.{leaf}"] = names
        return groups

    def leaves(self) -> set[str]:
        """Every module leaf the table names, in both namings (for naming adapter modules in inspect)."""
        found = {*self.top_level, *self.top_level.values()}
        for block in self.blocks:
            found |= set(block.leaves) | {leaf for parts in block.leaves.values() for leaf in parts}
        return found


#: A diffusion transformer of no known family, under a saver's prefix: its names are kept as stored, so
#: a LoRA in the model's own names (any dialect's prefix stripped, kohya-flattened or not) resolves.
GENERIC = DitFamily(name="DiT", native_layout="dit-native", diffusers_layout="dit-diffusers", blocks=(),
                    top_level={}, native_markers=(), diffusers_markers=())
