"""Which adapter modules are, or can become, a plain LoRA: the checks every writer of LoRA-only
formats and every `--rank` conversion shares (torch-free, so header-only readers can use them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import AdapterError, summarize
from .kinds import LayerKind

if TYPE_CHECKING:
    from .algorithms import AdapterModule


def lora_problems(modules: Mapping[str, AdapterModule], keep_norms: bool = False) -> list[str]:
    """Why modules cannot become plain LoRA: norm diffs (no low-rank form; allowed when the target keeps
    them as they are), one line each, and one line for all LoHa/LoKr updates whose layer shape only the
    base knows (a flat 2-D update may be a flattened Conv2d)."""
    problems, ambiguous = [], {}
    for name, module in sorted(modules.items()):
        if module.kind is LayerKind.NORM and not keep_norms:
            problems.append(f"{name}: a norm layer's 1-D {module.algorithm} update has no LoRA form "
                            "(only --to kohya keeps it, as it is)")
        elif module.shape_ambiguous:
            ambiguous[name] = module.algorithm
    if ambiguous:
        algorithms = "/".join(sorted(set(ambiguous.values())))
        problems.insert(0, f"{len(ambiguous)} {algorithms} module(s) ({summarize(list(ambiguous), 2)}) store conv "
                           "kernels flattened, so only the base tells a Linear from a Conv2d: pass --base")
    return problems


def lora_only_refusal(modules: Mapping[str, AdapterModule], why: str) -> AdapterError | None:
    """The one error for an adapter with LyCORIS modules (LoHa, LoKr, Tucker LoCon, full diffs) written
    where only plain LoRA fits (`why` says where), naming every algorithm it holds and the way out
    (`--rank`); None when every module is a plain LoRA."""
    if all(m.plain_lora for m in modules.values()):
        return None
    found: dict[str, list[str]] = {}
    for name, module in sorted(modules.items()):
        label = module.algorithm
        if not module.plain_lora and module.algorithm in ("lora", "locon"):
            label += " (Tucker)" if module.tucker else " (DoRA on the input axis)"
        found.setdefault(label, []).append(name)
    held = ", ".join(f"{label} on {summarize(names, 2)}" for label, names in sorted(found.items()))
    return AdapterError(f"{why}, and this adapter has {held}; convert with --rank R (or --energy E) to "
                        "approximate every module as a LoRA")
