"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` (or `.bin` with --allow-pickle)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..checkpoint.writer import LazyTensor, write_safetensors
from ..errors import AdapterError, summarize
from ..jsonio import LORA_CONFIG_RULES, check_fields, read_json
from ..lora.module import Adapter
from ..lora.kinds import LayerKind
from ..lora.algorithms import LoraModule
from ..lora.scaling import pattern_value

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."

#: LoRA tensor suffix -> (role, layer kind it implies). Longest suffixes first.
LORA_SUFFIXES: dict[str, tuple[str, LayerKind | None]] = {
    ".lora_embedding_A": ("A", LayerKind.EMBEDDING),
    ".lora_embedding_B": ("B", LayerKind.EMBEDDING),
    ".lora_magnitude_vector.weight": ("magnitude", None),
    ".lora_magnitude_vector": ("magnitude", None),
    ".lora_A.weight": ("A", None),
    ".lora_B.weight": ("B", None),
    ".lora_B.bias": ("bias", None),
}

#: `init_lora_weights` values whose initialisation rewrote the base weights; the saved A/B only make
#: sense against that rewritten base, which is not the base the user merges into.
BASE_CHANGING_INITS = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "loftq": "LoftQ",
}

#: Config fields naming LoRA variants whose update is not the plain s·B·A that loratool merges.
UNSUPPORTED_FEATURES = {
    "layer_replication": "layer replication (the adapted model has more layers than the base)",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (its update depends on the input tokens, so it cannot be merged)",
    "trainable_token_indices": "trainable token deltas (trainable_token_indices)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (the update depends on the input)",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "megatron_config": "Megatron-parallel layers",
}


def find_peft_folder(path: Path) -> Path | None:
    """The folder holding `adapter_config.json` for `path`: itself, the file's folder, or a single
    named-adapter subfolder of a folder with no weights of its own. Several named adapters are an
    error that lists them."""
    if path.is_file():
        return path.parent if (path.parent / CONFIG_NAME).is_file() else None
    if (path / CONFIG_NAME).is_file():
        return path
    if any(path.glob("*.safetensors")):
        return None  # a model folder that happens to hold an adapter subfolder is still a model
    named = sorted(p.parent for p in path.glob(f"*/{CONFIG_NAME}"))
    if len(named) > 1:
        names = ", ".join(str(p) for p in named)
        raise AdapterError(f"{path} holds several named adapters; pass one of: {names}")
    return named[0] if named else None


def _check_config(config: dict, config_path: Path) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{config_path}: this is a {peft_type} adapter; loratool handles LoRA adapters only")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        for prefix, label in BASE_CHANGING_INITS.items():
            if init.lower().startswith(prefix):
                raise AdapterError(
                    f"{config_path}: {label} initialisation (init_lora_weights={init!r}) rewrote the base weights "
                    "during training, so this adapter does not apply to the original base. Save it with PEFT's "
                    "path_initial_model_for_weight_conversion to get a plain LoRA, then use that"
                )
    used = [label for key, label in UNSUPPORTED_FEATURES.items() if config.get(key) not in (None, False, {}, [])]
    if used:
        raise AdapterError(f"{config_path}: uses {summarize(used)}, which loratool cannot merge exactly")
    check_fields(config, str(config_path), LORA_CONFIG_RULES, AdapterError)  # r, alpha, patterns: type and range


def _weights_file(folder: Path, given: Path) -> Path:
    if given.is_file():
        return given
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(f"{folder}: no adapter_model.safetensors (or adapter_model.bin) next to {CONFIG_NAME}")


def load_config_json(path: Path) -> dict:
    """An adapter_config.json as a dict (bounded, strict, its LoRA fields type-checked), or one clear error."""
    return read_json(path, AdapterError, rules=LORA_CONFIG_RULES)


def read_peft_adapter(path: Path, allow_pickle: bool = False, header_only: bool = False) -> Adapter:
    folder = find_peft_folder(path)
    if folder is None:
        raise AdapterError(f"{path}: no {CONFIG_NAME} found, so this is not a PEFT adapter")
    config_path = folder / CONFIG_NAME
    config = load_config_json(config_path)
    _check_config(config, config_path)
    weights_path = _weights_file(folder, path)
    with open_checkpoint(weights_path, allow_pickle=allow_pickle, quantized=False) as checkpoint:
        state = checkpoint.load_all(header_only)
    modules, full = _group_keys(state, weights_path)
    return Adapter(
        path=folder,
        source_format="peft",
        modules=_build_modules(modules, config, weights_path),
        full_tensors=full,
        config=config,
    )


#: safetensors metadata keys that some savers use for lora_alpha when no adapter_config.json travels along.
ALPHA_METADATA_KEYS = ("lora_alpha", "alpha", "ss_network_alpha")


def looks_like_bare_peft(keys: list[str]) -> bool:
    """PEFT's own tensor names (`base_model.model.….lora_A.weight`) in a file with no config beside it."""
    return bool(keys) and all(k.startswith(KEY_PREFIX) for k in keys) and any(
        k.endswith((".lora_A.weight", ".lora_embedding_A")) for k in keys)


def _metadata_alpha(metadata: dict[str, str], path: Path) -> float | None:
    for key in ALPHA_METADATA_KEYS:
        try:
            value = float(metadata[key])
        except (KeyError, ValueError):
            continue
        if not math.isfinite(value):
            raise AdapterError(f"{path}: metadata {key!r} is {metadata[key]!r}, not a finite lora_alpha; pass --alpha")
        if value > 0:
            return value
    return None


def read_bare_peft_adapter(path: Path, alpha: float | None = None, allow_pickle: bool = False,
                           need_alpha: bool = True, header_only: bool = False) -> Adapter:
    """PEFT weights downloaded or renamed without their adapter_config.json: ranks from the shapes,
    lora_alpha from `alpha` or the file's metadata. Without either, a command that computes fails
    naming --alpha; `need_alpha=False` (inspect) reads it with alpha unknown."""
    with open_checkpoint(path, allow_pickle=allow_pickle, quantized=False) as checkpoint:
        state = checkpoint.load_all(header_only)
        metadata = next(iter(checkpoint.metadata.values()), None) or {}
    known = alpha if alpha is not None else _metadata_alpha(metadata, path)
    if known is None and need_alpha:
        raise AdapterError(f"{path}: PEFT weights without their {CONFIG_NAME}, so lora_alpha is unknown; pass --alpha "
                           "(the lora_alpha it was trained with)")
    grouped, full = _group_keys(state, path)
    ranks = {name: parts["A"].shape[0] for name, (parts, _) in grouped.items() if "A" in parts}
    default_r = _most_common(list(ranks.values())) if ranks else 8
    config = {"r": default_r, "lora_alpha": known if known is not None else default_r,
              "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != default_r},
              "use_dora": any("magnitude" in parts for parts, _ in grouped.values())}
    modules = _build_modules(grouped, config, path)
    return Adapter(path=path, source_format="peft", modules=modules, full_tensors=full,
                   config={"lora_alpha": known, "r": default_r, "alpha_unknown": known is None, "bare": True})


def _group_keys(state: dict[str, torch.Tensor], source: Path):
    modules: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, LayerKind] = {}
    full: dict[str, torch.Tensor] = {}
    foreign = [k for k in state if not k.startswith(KEY_PREFIX)]
    if foreign:
        raise AdapterError(
            f"{source}: keys without the PEFT prefix {KEY_PREFIX!r}: {summarize(foreign)}; "
            "is this a full model checkpoint rather than an adapter?"
        )
    for key, tensor in state.items():
        key = key[len(KEY_PREFIX):]
        for suffix, (role, kind) in LORA_SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                modules.setdefault(module, {})[role] = tensor
                if kind is not None:
                    kinds[module] = kind
                break
        else:
            if ".lora_" in key or not key.endswith((".weight", ".bias")):
                raise AdapterError(f"{source}: unrecognised LoRA tensor {key!r} (neither a LoRA factor nor a whole "
                                   "weight or bias)")
            full[key.replace(".base_layer.", ".")] = tensor
    return {name: (parts, kinds.get(name)) for name, parts in modules.items()}, full


def _build_modules(grouped, config: dict, source: Path) -> dict[str, LoraModule]:
    default_r = config.get("r", 8)
    default_alpha = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    problems: list[str] = []
    modules: dict[str, LoraModule] = {}
    for name, (parts, kind) in sorted(grouped.items()):
        A, B = parts.get("A"), parts.get("B")
        if A is None or B is None:
            problems.append(f"{name} has {'lora_B' if A is None else 'lora_A'} but no {'lora_A' if A is None else 'lora_B'}")
            continue
        kind = kind or (LayerKind.CONV if A.dim() > 2 else LayerKind.LINEAR)
        rank = A.shape[0]
        if B.dim() < 2 or B.shape[1] != rank or A.dim() != B.dim() or any(s != 1 for s in B.shape[2:]):
            problems.append(f"{name}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not form a rank-{rank} pair")
            continue
        configured_r = pattern_value(rank_pattern, name, default_r)
        if configured_r != rank:
            problems.append(f"{name}: rank {rank} in the weights but r={configured_r} in the config")
            continue
        magnitude = parts.get("magnitude")
        if (magnitude is not None) != use_dora:
            problems.append(f"{name}: {'DoRA magnitude without use_dora' if magnitude is not None else 'use_dora set but no lora_magnitude_vector'}")
            continue
        modules[name] = LoraModule(
            name=name,
            kind=kind,
            lora_A=A,
            lora_B=B,
            alpha=float(pattern_value(alpha_pattern, name, default_alpha)),
            use_rslora=use_rslora,
            magnitude=magnitude.reshape(-1) if magnitude is not None else None,
            bias=parts.get("bias"),
        )
    if problems:
        raise AdapterError(f"{source}: {summarize(problems)}")
    if not modules:
        raise AdapterError(f"{source}: holds no LoRA tensors")
    return modules


#: transformers architecture suffix -> PEFT task type, so `from_pretrained` builds the right wrapper.
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
WEIGHTS_NAME = WEIGHT_NAMES[0]


def task_type_for(model_config: dict | None) -> str | None:
    """PEFT's task type for a transformers config's first architecture, when it has one."""
    for architecture in (model_config or {}).get("architectures") or []:
        for suffix, task in TASK_TYPES.items():
            if architecture.endswith(suffix):
                return task
    return None


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: list):
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def scaling_fields(modules: Mapping[str, LoraModule]) -> dict:
    """`r`, `lora_alpha`, `use_rslora` and the patterns that give every module its own rank and scale.

    The most common rank and alpha become the defaults; the rest go to `rank_pattern`/`alpha_pattern`
    under the module's full name (PEFT matches pattern keys as `(.*\\.)?(key)$`). When modules disagree
    on rsLoRA, rsLoRA is folded into alpha (alpha' = s·r) so one flag serves all and every scale holds.
    """
    flags = {m.use_rslora for m in modules.values()}
    use_rslora = flags == {True}
    alphas = {name: m.alpha if m.use_rslora == use_rslora else m.plain_alpha for name, m in modules.items()}
    r = _most_common([m.rank for m in modules.values()])
    lora_alpha = _most_common(list(alphas.values()))
    return {
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "use_rslora": use_rslora,
        "rank_pattern": {name: m.rank for name, m in sorted(modules.items()) if m.rank != r},
        "alpha_pattern": {name: _number(a) for name, a in sorted(alphas.items()) if a != lora_alpha},
    }


def lora_tensors(modules: Mapping[str, LoraModule], prefix: str = "",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The one PEFT-style writer loop, shared by PEFT folders and diffusers files: each module's tensors
    under `<prefix><module>` and PEFT's names (`lora_A.weight`/`lora_B.weight`, `lora_embedding_A/B`
    for embeddings, `lora_B.bias`, `lora_magnitude_vector`), cast to `dtype` when given, detached,
    on the CPU and contiguous."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    state: dict[str, torch.Tensor] = {}
    for name, module in sorted(modules.items()):
        key = prefix + name
        if module.kind is LayerKind.EMBEDDING:
            state[f"{key}.lora_embedding_A"] = cast(module.lora_A)
            state[f"{key}.lora_embedding_B"] = cast(module.lora_B)
        else:
            state[f"{key}.lora_A.weight"] = cast(module.lora_A)
            state[f"{key}.lora_B.weight"] = cast(module.lora_B)
        if module.bias is not None:
            state[f"{key}.lora_B.bias"] = cast(module.bias)
        if module.magnitude is not None:
            state[f"{key}.lora_magnitude_vector"] = cast(module.magnitude)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def lora_config_fields(modules: Mapping[str, LoraModule]) -> dict:
    """The LoraConfig fields that follow from the modules themselves: `scaling_fields`, `use_dora`
    and `lora_bias`, for PEFT's adapter_config.json and diffusers' per-component metadata alike."""
    return {**scaling_fields(modules), "use_dora": any(m.is_dora for m in modules.values()),
            "lora_bias": any(m.bias is not None for m in modules.values())}


def adapter_state_dict(modules: Mapping[str, LoraModule], full_tensors: Mapping[str, torch.Tensor | LazyTensor],
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | LazyTensor]:
    """Tensors under the keys PEFT saves, the factors cast to `dtype` when given; `full_tensors` (which
    may be lazy) keep their own dtype and are named as in the model (`model.norm.weight`)."""
    state: dict[str, torch.Tensor | LazyTensor] = lora_tensors(modules, KEY_PREFIX, dtype)
    for name, tensor in sorted(full_tensors.items()):
        module, _, param = name.rpartition(".")
        # A LoRA-wrapped module keeps its own tensors under `base_layer` (PEFT's bias="lora_only", and the
        # embedding weights it saves alongside embedding LoRA).
        key = f"{module}.base_layer.{param}" if module in modules else name
        state[KEY_PREFIX + key] = tensor if isinstance(tensor, LazyTensor) else tensor.detach().to("cpu").contiguous()
    return state


def write_peft_adapter(folder: Path, modules: Mapping[str, LoraModule],
                       full_tensors: Mapping[str, torch.Tensor | LazyTensor],
                       config: dict, dtype: torch.dtype | None = None) -> list[Path]:
    """Write `adapter_config.json` + `adapter_model.safetensors` into an existing `folder`.

    `config` supplies everything but the scaling fields, which are derived from the modules so that
    they always agree with the tensors.
    """
    biased = {m.bias is not None for m in modules.values()}
    if len(biased) > 1:
        raise AdapterError("some modules carry a lora_B bias and others do not; PEFT's lora_bias is all or nothing")
    full_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        **config,
        **lora_config_fields(modules),
    }
    weights = folder / WEIGHTS_NAME
    write_safetensors(weights, adapter_state_dict(modules, full_tensors, dtype))
    config_path = folder / CONFIG_NAME
    config_path.write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")
    return [config_path, weights]


def fill_missing_biases(modules: Mapping[str, LoraModule]) -> list[str]:
    """PEFT's `lora_bias` is one flag for all modules: when any module carries a lora_B bias, give the
    other (non-embedding) modules a zero one. Returns the names filled."""
    if not any(getattr(m, "bias", None) is not None for m in modules.values()):
        return []
    filled = []
    for module in modules.values():
        if module.plain_lora and module.bias is None and module.kind is not LayerKind.EMBEDDING:
            module.bias = torch.zeros(module.natural_shape()[0], dtype=module.dtype)
            filled.append(module.name)
    return filled
