"""One strict, bounded JSON reader for everything loratool parses out of a file: safetensors headers and
the JSON sidecars (`config.json`, `model_index.json`, `adapter_config.json`, index files, metadata JSON).

Before `json.loads` runs, the raw text is pre-scanned for its number of values and its nesting depth
with a few linear bytes operations (no Python loop per character), so a header nested 100k levels
deep, or one holding a billion values, is refused before the parser recurses or allocates. The parse
then refuses what `json` would silently accept: a key twice in one object (`json` keeps the last,
other readers may keep the first), `NaN`/`Infinity` and numbers that overflow to infinity (none of
them is JSON). After it, `check_fields` checks the type and range of the keys loratool reads,
so a bad value is one line that names the file and the key, never a TypeError deep inside a command.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidCheckpointError, LoratoolError, summarize


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_values: int
    max_depth: int


#: Deeper than any real header or config (a safetensors header needs 3 levels, config.json a handful),
#: far below the depth at which the parser would recurse out of stack.
MAX_DEPTH = 64
#: JSON sidecars: the largest real ones (a sharded index of a 600B-parameter model) are about 10 MB.
SIDECAR = Limits(max_bytes=64 << 20, max_values=4_000_000, max_depth=MAX_DEPTH)
#: safetensors headers: the byte ceiling is the safetensors library's; 16M values is 1M tensors of
#: 4-D shapes, well beyond any real checkpoint.
HEADER = Limits(max_bytes=100_000_000, max_values=16_000_000, max_depth=MAX_DEPTH)

_ErrorType = type[LoratoolError]


class _NonFinite:
    """What NaN, Infinity and overflowing numbers parse to, so that the check after the parse can name
    their key."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return result


# -- the pre-scan ---------------------------------------------------------------------------------------

#: Every byte but quotes, brackets and commas: deleted before the structure is looked at.
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{},')
#: Both kinds of bracket as one: the parser recurses on every opening bracket, whatever closes it.
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")


def _structure(raw: bytes) -> bytes:
    """The brackets and commas of `raw` that lie outside strings, in order.

    Escaped backslashes, then escaped quotes, are dropped first (left to right, as JSON reads them).
    Then everything but quotes, brackets and commas is deleted, and adjacent quote pairs are dropped:
    that keeps the parity of the quotes before every remaining byte, so the strings with no bracket or
    comma inside (nearly all of them) vanish in one pass, and only the rest need a split."""
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    reduced = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in reduced:
        reduced = b"".join(reduced.split(b'"')[::2])
    return reduced


def _depth(structure: bytes, limit: int) -> int:
    """How deep the parser would recurse, or a number above `limit` as soon as that is certain.

    Each pass drops the innermost `[]` pairs (one level; `bytes.replace` does not rescan what it
    joined). Brackets that do not balance stop the passes: the parser stops at the first such
    bracket, no deeper than the levels removed plus the brackets left."""
    brackets = structure.translate(_ONE_BRACKET, b",")
    if b"[" * (limit + 1) in brackets:
        return limit + 1
    depth = 0
    while brackets and depth <= limit:
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return depth + len(brackets)
        brackets, depth = shorter, depth + 1
    return depth


# -- parsing --------------------------------------------------------------------------------------------


_NAMES = {dict: "object", list: "list"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def key_path(path: tuple) -> str:
    """`rank_pattern['q_proj']`, `shape[1]`: a key inside the document, as one unambiguous string."""
    if not path:
        return "the document"
    head, rest = path[0], path[1:]
    return (repr(head) if isinstance(head, str) else f"[{head}]") + "".join(f"[{p!r}]" for p in rest)


def _find_nonfinite(value: Any, path: tuple = ()) -> tuple[tuple, _NonFinite] | None:
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, _NonFinite):
            return where, item
        if isinstance(item, dict):
            stack.extend((v, (*where, k)) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, (*where, i)) for i, v in reversed(list(enumerate(item))))
    return None


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that builds millions of objects and no cycles
    (parsing a header, then validating its entries): its collections would only halve the speed."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def parse_json(raw: bytes | str, source: str, error: _ErrorType = InvalidCheckpointError,
               limits: Limits = SIDECAR, expect: type | None = dict) -> Any:
    """Parse `raw` strictly within `limits`, or raise `error` with one line that starts with `source`
    (the file, and where useful what in it: `x.safetensors: safetensors header`)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > limits.max_bytes:
        raise error(f"{source}: {len(data):,} bytes of JSON, over the {limits.max_bytes:,}-byte limit")
    try:
        text = data.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise error(f"{source}: not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from e
    structure = _structure(data)
    values = structure.count(b",") + structure.count(b"[") + structure.count(b"{") + 1
    if values > limits.max_values:
        raise error(f"{source}: holds about {values:,} JSON values, over the limit of {limits.max_values:,}")
    if _depth(structure, limits.max_depth) > limits.max_depth:
        raise error(f"{source}: JSON nested more than {limits.max_depth} levels deep")
    nonfinite: list[str] = []

    def constant(name: str) -> _NonFinite:
        nonfinite.append(name)
        return _NonFinite(name)

    def real(number: str) -> float | _NonFinite:
        value = float(number)
        return value if math.isfinite(value) else constant(number)

    try:
        with collector_paused():
            parsed = json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=constant, parse_float=real)
    except _Duplicate as e:
        raise error(f"{source}: key {e.key!r} appears twice in one object (which one is meant is ambiguous)") from None
    except RecursionError as e:  # the pre-scan bounds the depth; this only guards against a smaller stack
        raise error(f"{source}: JSON nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, and ints of more digits than Python converts
        raise error(f"{source}: not valid JSON ({e})") from e
    if nonfinite:
        where, value = _find_nonfinite(parsed)
        raise error(f"{source}: {key_path(where)} is {value.text}, which is not a JSON number; write a finite value")
    if expect is not None and not isinstance(parsed, expect):
        raise error(f"{source}: expected a JSON {_NAMES.get(expect, expect.__name__)}, found {_kind(parsed)}")
    return parsed


def read_json(path: str | os.PathLike, error: _ErrorType = InvalidCheckpointError, limits: Limits = SIDECAR,
              expect: type | None = dict, rules: Mapping[str, Rule] | None = None) -> Any:
    """A JSON sidecar file, parsed by `parse_json`; with `rules`, its keys checked by `check_fields`."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block, or never end
            raise error(f"{path}: not a regular file")
        size = info.st_size
        if size > limits.max_bytes:
            raise error(f"{path}: {size:,} bytes of JSON, over the {limits.max_bytes:,}-byte limit")
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from e
    parsed = parse_json(raw, str(path), error, limits, expect)
    if rules is not None:
        check_fields(parsed, str(path), rules, error)
    return parsed


# -- type and range checks at the edge ------------------------------------------------------------------

#: A rule returns None when a value is acceptable, else what the value must be ("a whole number ..."),
#: or a `Said`: the whole rest of the message after the key's name (for a key inside the value).
Rule = Callable[[Any], "str | None"]


class Said(str):
    """A rule's complete message about a part of the value: printed right after the key's name."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(obj: Mapping, source: str, rules: Mapping[str, Rule], error: _ErrorType = InvalidCheckpointError,
                 prefix: str = "") -> None:
    """Check the keys of `obj` that `rules` names (absent keys are fine; others are not looked at), and
    raise `error` with every problem in one line: `source: key must be ..., got ...`."""
    problems = []
    for key, rule in rules.items():
        if key in obj:
            wanted = rule(obj[key])
            if isinstance(wanted, Said):
                problems.append(f"{prefix}{key}{wanted}")
            elif wanted is not None:
                problems.append(f"{prefix}{key} must be {wanted}, got {_show(obj[key])}")
    if problems:
        raise error(f"{source}: {summarize(problems)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(low: int, high: int, nullable: bool = False) -> Rule:
    """An int from `low` to `high` (bools are not ints here)."""
    def rule(value):
        if (value is None and nullable) or (_is_int(value) and low <= value <= high):
            return None
        return f"a whole number from {low} to {high:,}" + (" (or null)" if nullable else "")
    return rule


def positive_number(nullable: bool = False) -> Rule:
    """A finite real number above 0."""
    def rule(value):
        if (value is None and nullable) or (_is_real(value) and value > 0):
            return None
        return "a positive number" + (" (or null)" if nullable else "")
    return rule


def string(nullable: bool = True) -> Rule:
    def rule(value):
        return None if isinstance(value, str) or (value is None and nullable) else "a string"
    return rule


def boolean(nullable: bool = True) -> Rule:
    def rule(value):
        return None if isinstance(value, bool) or (value is None and nullable) else "true or false"
    return rule


def strings(nullable: bool = True, single: bool = False) -> Rule:
    """A list of strings (or, with `single`, one string)."""
    def rule(value):
        if (value is None and nullable) or (single and isinstance(value, str)):
            return None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return None
        return "a list of strings" + (" or a string" if single else "")
    return rule


def either(*rules: Rule) -> Rule:
    def rule(value):
        wanted = [r(value) for r in rules]
        return None if None in wanted else " or ".join(wanted)
    return rule


def list_of(item: Rule, what: str) -> Rule:
    def rule(value):
        return None if isinstance(value, list) and all(item(v) is None for v in value) else f"a list of {what}"
    return rule


def regex_error(key: str) -> str | None:
    """Why a PEFT pattern key does not compile, alone (so that positions are the key's own) or as
    PEFT matches it (`(.*\\.)?(key)$`), or None."""
    wrapped = rf"(.*\.)?({key})$"
    for pattern, within in ((key, ""), (wrapped, f" of {wrapped!r}, as PEFT matches it")):
        try:
            re.compile(pattern)
        except re.error as e:
            return f"{e}{within}"
    return None


def patterns(value_rule: Rule) -> Rule:
    """PEFT's `rank_pattern`/`alpha_pattern`: an object whose keys are regexes that compile and whose
    values pass `value_rule`. The message names the first bad key."""
    def rule(value):
        if value is None:
            return None
        if not isinstance(value, dict):
            return "an object of regex -> value"
        for key, item in value.items():
            why = regex_error(key)
            if why is not None:
                return Said(f" key {key!r} is not a valid regular expression ({why})")
            wanted = value_rule(item)
            if wanted is not None:
                return Said(f"[{key!r}] must be {wanted}, got {_show(item)}")
        return None
    return rule


# -- the sidecars' rules ---------------------------------------------------------------------------------

#: Layer and head counts beyond any real model (the largest have under 200 layers and 128 heads): a
#: count past these is a broken or hostile config, refused before anything is sized by it.
MAX_LAYERS = 1024
MAX_HEADS = 4096
#: LoRA ranks beyond any real adapter's (a full-rank update of a 64k-wide matrix).
MAX_RANK = 1 << 16

#: `config.json` of a transformers model or a diffusers component: the keys loratool reads (or that
#: size something), checked wherever the config is opened.
MODEL_CONFIG_RULES: dict[str, Rule] = {
    "architectures": strings(),
    "model_type": string(),
    "_name_or_path": string(),
    "_class_name": string(),
    "tie_word_embeddings": boolean(),
    "torch_dtype": string(),
    "dtype": string(),
    "num_hidden_layers": whole(1, MAX_LAYERS),
    "n_layer": whole(1, MAX_LAYERS),
    "num_layers": whole(1, MAX_LAYERS, nullable=True),
    "num_single_layers": whole(0, MAX_LAYERS, nullable=True),
    "num_attention_heads": either(whole(1, MAX_HEADS, nullable=True), list_of(whole(1, MAX_HEADS), "head counts")),
    "num_key_value_heads": whole(1, MAX_HEADS, nullable=True),
    "n_head": whole(1, MAX_HEADS),
    "lora_alpha": positive_number(nullable=True),
}

#: `model_index.json` of a diffusers pipeline.
MODEL_INDEX_RULES: dict[str, Rule] = {"_class_name": string(), "_diffusers_version": string()}

#: A PEFT LoraConfig (adapter_config.json, or one component's config in diffusers metadata), and the
#: LoHa/LoKr configs' `alpha`.
LORA_CONFIG_RULES: dict[str, Rule] = {
    "peft_type": string(),
    "r": whole(1, MAX_RANK),
    "lora_alpha": positive_number(),
    "alpha": positive_number(),
    "rank_pattern": patterns(whole(1, MAX_RANK)),
    "alpha_pattern": patterns(positive_number()),
    "use_rslora": boolean(),
    "use_dora": boolean(),
    "fan_in_fan_out": boolean(),
    "target_modules": strings(single=True),
    "modules_to_save": strings(),
    "base_model_name_or_path": string(),
}
