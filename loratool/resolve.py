"""The one resolver: where each module of an adapter lands on a base.

`resolve(adapter, layout)` is the only place that decides, for every adapter module, which base tensor
it updates, which row slice of a fused tensor (Flux `qkv`, OpenCLIP `in_proj_weight`), and in which
orientation (HF `Conv1D` stores (in, out)). merge plans its ops from the landings; convert, combine,
resize, svd-extract and the GGUF export take their module names and layer shapes from them.

Names go through the base's layout (`layouts/`), shapes through the module's own rule
(`AdapterModule.orientations`), and square weights, which fit both ways, through the base's model
type (`lora/targeting.choose_orientation`). Every problem is collected and raised as one error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import AdapterError, MismatchError, summarize
from .lora.algorithms.base import stored
from .lora.targeting import choose_orientation

if TYPE_CHECKING:
    from .layouts import BaseLayout, Piece
    from .lora.algorithms import AdapterModule
    from .lora.module import Adapter


@dataclass(frozen=True)
class Landing:
    """One adapter module (or its part of a fused module) on one base weight."""

    #: The adapter's own name for the module.
    source: str
    #: The module restricted to this piece, named, and fitted to the base weight's logical shape.
    module: AdapterModule
    piece: Piece
    #: The base stores this weight as HF `Conv1D`'s (in, out).
    transposed: bool


@dataclass
class Resolution:
    landings: list[Landing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Adapter modules the base lacks, left out with `skip_missing`.
    skipped: list[str] = field(default_factory=list)


def _stored_shape(piece: Piece) -> tuple[int, ...]:
    target = piece.target
    if target.rows is None:
        return tuple(target.shape)
    return (target.rows[1] - target.rows[0], *target.shape[1:])


def _fused_rows_problem(name: str, module: AdapterModule, pieces: tuple[Piece, ...]) -> str | None:
    """A module on a fused alias must have exactly the rows its parts take (97 rows on a 96-row qkv is
    some other model's LoRA, and cutting it would drop a row silently)."""
    stops = [p.lora_rows[1] for p in pieces if p.lora_rows is not None]
    if not stops:
        return None
    rows = module.expected_base_shape()[0]
    if rows != max(stops):
        parts = "+".join(p.module.rsplit(".", 1)[-1] for p in pieces)
        return f"{name}: a fused update with {rows} output rows, but the base's {parts} take {max(stops)}"
    return None


def resolve(adapter: Adapter, layout: BaseLayout, canonical_names: bool = True,
            skip_missing: bool = False) -> Resolution:
    """Every landing of `adapter`'s modules on the base `layout`, or one MismatchError listing every
    module that does not fit (unknown names, shapes, DoRA on a fused tensor, a bias with nowhere to go,
    two modules on the same base rows).

    With `canonical_names` each landing's module is named as the base's canonical module (diffusers'
    names for diffusion models); otherwise it keeps the adapter's name unless a fused module splits.
    With `skip_missing`, modules the base lacks are listed in `skipped` instead of refused (a Wan I2V
    LoRA's `k_img`/`v_img` on a T2V base); everything else is still checked.
    """
    pieces_of = layout.resolve(adapter.modules, flat=adapter.unresolved_names, source=adapter.path,
                               skip_missing=skip_missing)
    skipped = sorted(set(adapter.modules) - set(pieces_of))
    if adapter.modules and not pieces_of:
        raise MismatchError(f"{adapter.path}: none of its {len(skipped)} modules is in the base {layout.path} "
                            f"({layout.summary()}): {summarize(skipped)}")
    model_type = (layout.config or {}).get("model_type")
    problems: list[str] = []
    candidates: dict[int, list[bool]] = {}
    parts: list[tuple[str, AdapterModule, Piece]] = []
    taken: dict[tuple, str] = {}
    for name, module in adapter.modules.items():
        if name not in pieces_of:
            continue
        pieces = pieces_of[name]
        fused = _fused_rows_problem(name, module, pieces)
        if fused:
            problems.append(fused)
            continue
        for piece in pieces:
            target = piece.target
            # B's row halves as the landing needs them: in the canonical module's order when renamed to it
            # (convert), in the stored tensor's order otherwise (merge)
            swap = piece.swap_lora if canonical_names else piece.swap_lora != target.swap_halves
            part_name = piece.module if canonical_names or len(pieces) > 1 else name
            part = module.restricted(part_name, piece.lora_rows, swap)
            shape = _stored_shape(piece)
            options = part.orientations(shape)
            if target.transposed is not None:
                options = [t for t in options if t == target.transposed]
            if not options:
                expected = stored(part.natural_shape(), bool(target.transposed))
                problems.append(f"{part.name}: base {target.weight} is {list(shape)} but the {module.algorithm} "
                                f"update fits {list(expected)}")
            if module.is_dora and (target.rows is not None or piece.lora_rows is not None):
                problems.append(f"{name}: DoRA on a fused tensor ({target.weight}) is not supported")
            if part.bias is not None and target.bias is None:
                problems.append(f"{part.name} has a bias update but the base module has no bias")
            spot = (target.source, target.weight, target.rows)
            if spot in taken:
                problems.append(f"{name} and {taken[spot]} both update {target.weight}"
                                + (f" rows {target.rows[0]}:{target.rows[1]}" if target.rows else ""))
            taken.setdefault(spot, name)
            candidates[len(parts)] = options
            parts.append((name, part, piece))
    if problems:
        raise MismatchError(f"{adapter.path} does not fit the base: {summarize(problems)}")
    orientation, note = choose_orientation(candidates, model_type, adapter.fan_in_fan_out)
    resolution = Resolution(notes=[f"{adapter.path}: {note}"] if note else [], skipped=skipped)
    for index, (name, part, piece) in enumerate(parts):
        transposed = orientation[index]
        part.fit_to(stored(_stored_shape(piece), transposed))
        resolution.landings.append(Landing(name, part, piece, transposed))
    return resolution


def resolved_modules(adapter: Adapter, layout: BaseLayout, canonical_names: bool = True
                     ) -> dict[str, AdapterModule]:
    """The adapter's modules as they land on the base, by name (for commands that write adapters)."""
    modules: dict[str, AdapterModule] = {}
    clashes = []
    for landing in resolve(adapter, layout, canonical_names).landings:
        name = landing.module.name
        if name in modules:
            clashes.append(f"{name} (from {landing.source} and another module)")
        modules[name] = landing.module
    if clashes:
        raise AdapterError(f"{adapter.path}: several modules update the same base module: {summarize(clashes)}")
    return modules
