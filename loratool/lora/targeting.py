"""Matching adapter modules to base tensors: name prefixes and HF `Conv1D` orientation.

Pure logic over names and shapes; the caller supplies the base checkpoint's header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..layouts.index import name_transforms

#: transformers model types whose projections are `Conv1D`, storing W as (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"})


def resolve_base_names(
    module_names: Iterable[str], tensor_names: Iterable[str], base_keys: Mapping[str, object]
) -> tuple[dict[str, str], list[str]]:
    """Map adapter names onto the base's naming.

    Adapters name modules as the trained model class did (`model.layers.0...` for a CausalLM), while a
    base may have been saved from another class (`layers.0...`, `transformer.h.0...`). One transform
    (identity, drop the first component, or add a base top-level prefix) is chosen for the whole
    adapter: the one that resolves most names, identity on ties. Module names resolve to their module
    path (its `.weight` must exist); tensor names resolve to a tensor. Returns the mapping and the
    names no transform resolved.
    """
    modules, tensors = list(module_names), list(tensor_names)

    def resolved(transform) -> dict[str, str]:
        hits = {n: transform(n) for n in modules if f"{transform(n)}.weight" in base_keys}
        hits.update({n: transform(n) for n in tensors if transform(n) in base_keys})
        return hits

    best: dict[str, str] = {}
    for transform in name_transforms(base_keys):
        candidate = resolved(transform)
        if len(candidate) > len(best):
            best = candidate
    return best, [n for n in modules + tensors if n not in best]


def choose_orientation(
    candidates: Mapping[str, list[bool]], model_type: str | None, fan_in_fan_out: bool
) -> tuple[dict[str, bool], str | None]:
    """Decide each module's orientation from the base, not from the adapter's `fan_in_fan_out`.
    `candidates` holds each module's options, from `AdapterModule.orientations`.

    Non-square weights decide themselves. Square ones (GPT-2's attention c_proj) follow the model
    type when the base config names one, then the evidence of the non-square modules, and only then
    the adapter's flag. Returns the decisions and a note when the flag had to be trusted.
    """
    decided = {name: opts[0] for name, opts in candidates.items() if len(opts) == 1}
    evidence = set(decided.values())
    if model_type is not None:
        fallback, note = model_type in CONV1D_MODEL_TYPES, None
    elif len(evidence) == 1:
        fallback, note = evidence.pop(), None
    else:
        fallback = fan_in_fan_out
        note = "square weights with no config.json to tell their layout; trusted the adapter's fan_in_fan_out"
    ambiguous = [name for name, opts in candidates.items() if len(opts) > 1]
    decided.update({name: fallback for name in ambiguous})
    return decided, note if ambiguous else None


#: Module leaf names of token and position embeddings (2-D weights that are lookups, not linears).
EMBEDDING_LEAVES = frozenset({
    "embed_tokens", "embed_positions", "embed_in", "wte", "wpe", "word_embeddings", "position_embeddings",
    "token_type_embeddings", "tok_embeddings", "shared",
})
#: Module leaf names of the token embeddings an output head can be tied to.
TOKEN_EMBEDDING_LEAVES = frozenset({"embed_tokens", "embed_in", "wte", "word_embeddings", "tok_embeddings"})
#: Module leaf names of output heads tied to, or shaped like, the vocabulary.
OUTPUT_HEAD_LEAVES = frozenset({"lm_head", "embed_out"})


def leaf(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def head_is_tied(config: dict | None, tensor_names: Iterable[str] | None) -> bool:
    """Whether the base's output head is its input embedding (`tie_word_embeddings`): so the config says,
    or the checkpoint stores a token embedding and no head weight (the tied copy is not saved)."""
    if config and config.get("tie_word_embeddings"):
        return True
    if tensor_names is None:
        return False
    modules = {name.removesuffix(".weight") for name in tensor_names if name.endswith(".weight")}
    return not any(leaf(m) in OUTPUT_HEAD_LEAVES for m in modules) and any(leaf(m) in TOKEN_EMBEDDING_LEAVES
                                                                          for m in modules)


#: PEFT condenses a target_modules *list* of this many entries or more into shared suffixes, and the
#: result can match parent modules (a suffix like `0` matches `down_blocks.0`); a regex is not condensed.
PEFT_CONDENSE_THRESHOLD = 20


def target_suffix(module_name: str) -> str:
    """The shortest dotted suffix ending in a named component: `q_proj`, but `to_out.0` and `net.2`,
    since PEFT matches a bare `0` against every container called `….0` too."""
    parts = module_name.split(".")
    start = len(parts) - 1
    while start > 0 and parts[start].isdigit():
        start -= 1
    return ".".join(parts[start:])


def compact_target_modules(targeted: Iterable[str], candidates: Iterable[str] | None = None) -> list[str] | str:
    """PEFT `target_modules` selecting exactly `targeted`.

    The short suffixes (`q_proj`, `to_out.0`, ...) when `candidates` (every module of the base with a
    weight) shows they select nothing else; otherwise the full names, as a list when short and as one anchored regex when
    PEFT would otherwise condense the list into suffixes that can over-match.
    """
    targeted = set(targeted)
    if candidates is not None:
        suffixes = {target_suffix(name) for name in targeted}
        if {name for name in candidates if any(name == s or name.endswith("." + s) for s in suffixes)} == targeted:
            return sorted(suffixes)
    if len(targeted) < PEFT_CONDENSE_THRESHOLD:
        return sorted(targeted)
    return "(?:" + "|".join(re.escape(name) for name in sorted(targeted)) + ")"
