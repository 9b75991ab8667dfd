"""The resolved view of a base: canonical module names, the tensors they live in, and every alias
(another dialect's name for the same module) that a LoRA may use."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

#: A row range [start, stop) of a tensor.
Rows = tuple[int, int]


@dataclass(frozen=True)
class Target:
    """Where a module's weight lives in the base.

    `rows` is the module's row range inside a fused base tensor (OpenCLIP `in_proj_weight`, Flux
    `qkv`); `transposed` is True when the base stores the weight transposed (OpenCLIP
    `text_projection`), False when not, None when only the shapes can tell (HF `Conv1D` models);
    `swap_halves` says the base orders the two row halves the other way round (Flux `norm_out`).
    """

    source: str | None
    weight: str
    bias: str | None = None
    rows: Rows | None = None
    transposed: bool | None = False
    swap_halves: bool = False
    #: The whole base tensor's shape (before `rows`), from the header.
    shape: tuple[int, ...] | None = None

    @property
    def module_shape(self) -> tuple[int, ...] | None:
        """The shape of this module's part: its rows of a fused tensor, transposed back when stored so."""
        if self.shape is None:
            return None
        shape = self.shape if self.rows is None else (self.rows[1] - self.rows[0], *self.shape[1:])
        return tuple(reversed(shape)) if self.transposed and len(shape) == 2 else tuple(shape)


@dataclass(frozen=True)
class Piece:
    """One canonical module that an adapter module updates. A LoRA on a fused module (Flux `qkv`)
    becomes several pieces, each fed by a row range of its B (`lora_rows`)."""

    module: str
    target: Target
    lora_rows: Rows | None = None
    #: The LoRA's B rows are in the other half order than the canonical module's (a BFL-named LoRA on
    #: `final_layer.adaLN_modulation.1` read as diffusers' `norm_out.linear`).
    swap_lora: bool = False


def name_transforms(names: Iterable[str]) -> list[Callable[[str], str]]:
    """The renamings tried to fit an adapter's names to a plain model's: as is, without the first
    component, or under one of the model's own top-level prefixes (an adapter names modules as the
    trained class did, `model.layers.0…`, a base may be saved from another class, `layers.0…`)."""
    transforms: list[Callable[[str], str]] = [lambda n: n, lambda n: n.split(".", 1)[1] if "." in n else n]
    for prefix in sorted({k.split(".", 1)[0] for k in names if "." in k}):
        transforms.append(lambda n, p=prefix: f"{p}.{n}")
    return transforms


def flatten(module: str) -> str:
    """kohya's flattened spelling of a module path."""
    return module.replace(".", "_")


@dataclass
class Component:
    """One model of a base (the UNet, a text encoder, an LLM): canonical modules and their aliases.

    `name` is the diffusers pipeline component (`unet`, `text_encoder`, ...), or None for a plain model;
    `layout` names how the base stores it (`ldm-unet`, `diffusers-unet`, `hf-clip`, `open-clip`,
    `flux-bfl`, `flux-diffusers`, `transformers`).
    """

    name: str | None
    layout: str
    _targets: dict[str, Target] = field(default_factory=dict, repr=False)
    #: alias -> ((canonical module, rows of the LoRA's B that feed it, halves swapped), ...)
    _aliases: dict[str, tuple[tuple[str, Rows | None, bool], ...]] = field(default_factory=dict, repr=False)
    _flat: dict[str, set[tuple]] | None = field(default=None, repr=False)
    _sole: dict[str, tuple[str, bool]] | None = field(default=None, repr=False)
    #: Fills the tables on first use: a plain model's 400k tensors need no table to say what the base is.
    build: Callable[[Component], None] | None = field(default=None, repr=False)

    def _built(self) -> None:
        if self.build is not None:
            build, self.build = self.build, None
            build(self)

    @property
    def targets(self) -> dict[str, Target]:
        self._built()
        return self._targets

    @property
    def aliases(self) -> dict[str, tuple[tuple[str, Rows | None, bool], ...]]:
        self._built()
        return self._aliases

    def add(self, module: str, target: Target, *aliases: str) -> None:
        self.targets[module] = target
        for alias in aliases:
            if alias and alias != module:
                self.aliases.setdefault(alias, ((module, None, False),))

    def add_group(self, alias: str, parts: tuple[tuple[str, Rows | None, bool], ...]) -> None:
        self.aliases[alias] = parts

    def qualified(self, module: str) -> str:
        return f"{self.name}.{module}" if self.name else module

    def pieces(self, path: str) -> tuple[Piece, ...] | None:
        """The pieces a dotted module path names, directly or through an alias."""
        if path in self.targets:
            return (Piece(self.qualified(path), self.targets[path]),)
        parts = self.aliases.get(path)
        if parts is None:
            return None
        return tuple(Piece(self.qualified(module), self.targets[module], rows, swap) for module, rows, swap in parts)

    def sole_alias(self, module: str) -> tuple[str, bool] | None:
        """(an alias that names `module` alone, not as a row slice, and whether its halves are swapped),
        or None: a native name to write a LoRA of `module` under."""
        if self._sole is None:
            self._sole = {}
            for alias, parts in self.aliases.items():
                if len(parts) == 1 and parts[0][1] is None:
                    self._sole.setdefault(parts[0][0], (alias, parts[0][2]))
        return self._sole.get(module)

    def flat_candidates(self, flat: str) -> list[tuple[Piece, ...]]:
        """Every distinct resolution of a kohya-flattened name (several means the name is ambiguous)."""
        if self._flat is None:
            index: dict[str, set[tuple]] = {}
            for path in list(self.targets) + list(self.aliases):
                index.setdefault(flatten(path), set()).add(self.pieces(path))
            self._flat = index
        return sorted(self._flat.get(flat, ()), key=lambda pieces: [p.module for p in pieces])
