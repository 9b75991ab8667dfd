"""PEFT LoHa and LoKr adapters (`peft_type` LOHA / LOKR): reader and writer.

PEFT saves the LyCORIS roles under `base_model.model.<module>.<role>` (`hada_w1_a`, `lokr_w2_b`,
`hada_t1`, `lokr_t2`…, no `.weight`), `modules_to_save` tensors under their model names, and no alpha
tensors: every module's scale is alpha/r from the config (`r`, `alpha`, `rank_pattern`,
`alpha_pattern`), LoKr included. That differs from LyCORIS' files in one case: a LoKr module with
both halves full has scale 1 in LyCORIS, alpha/r in PEFT. The reader keeps PEFT's scale (it sets the
module's `dim` to the configured r); the writer gives each module an alpha of scale·r, so PEFT
reproduces the module's ΔW whatever convention it came from.

PEFT also decides each layer's tensor layout itself, from the base layer and the config: the
Kronecker split from `decompose_factor` (one value for all modules), whether w1 is factored
(`decompose_both` and r < max(a, c)/2), whether w2 is (r < max(b, d)/2), and Tucker cores for
kh×kw > 1 convs from `use_effective_conv2d`. The writer chooses those fields and rewrites tensors
where PEFT's layout differs but holds the same ΔW exactly (a factored half multiplied out, a Tucker
half flattened, see `lora/algorithms/factors.py`); what no config can express is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import open_checkpoint
from ..checkpoint.writer import LazyTensor, write_safetensors
from ..errors import AdapterError, summarize
from ..jsonio import read_json
from ..lora.algorithms import LoHa, LoKr, split_key, tucker_to_flat
from ..lora.module import Adapter
from ..lora.scaling import pattern_value
from .peft import (
    CONFIG_NAME,
    KEY_PREFIX,
    WEIGHTS_NAME,
    _most_common,
    _number,
    _weights_file,
    find_peft_folder,
    load_config_json,
)

if TYPE_CHECKING:
    import torch

#: Roles whose first dimension is PEFT's r.
RANK_ROLES = ("hada_w1_b", "hada_w2_b", "lokr_w1_b", "lokr_w2_b")
#: PEFT type -> (loratool algorithm, module class, source_format).
PEFT_TYPES = {"LOHA": ("loha", LoHa, "peft_loha"), "LOKR": ("lokr", LoKr, "peft_lokr")}


#: Fields of a PEFT LoHa/LoKr config that mean the same in a LoRA config (the rest are LoHa/LoKr's own).
SHARED_CONFIG_FIELDS = ("base_model_name_or_path", "task_type", "target_modules", "modules_to_save", "revision",
                        "layers_to_transform", "layers_pattern", "exclude_modules")


def as_lora_config(config: dict, source_format: str) -> dict:
    """The part of a source adapter's config a PEFT LoRA written from it may keep: all of a LoRA's,
    only the shared fields of a LoHa/LoKr's (never its peft_type, r, alpha or layout fields)."""
    if source_format not in {entry[2] for entry in PEFT_TYPES.values()}:
        return dict(config)
    return {key: config[key] for key in SHARED_CONFIG_FIELDS if key in config}


def peft_type_of(folder: Path) -> str | None:
    """LOHA/LOKR when `folder`'s adapter_config.json names one, else None (not this reader's)."""
    try:  # bounded and strict (jsonio); a broken config is reported by the reader that loads it
        peft_type = str(read_json(folder / CONFIG_NAME, AdapterError).get("peft_type", "")).upper()
    except AdapterError:
        return None
    return peft_type if peft_type in PEFT_TYPES else None


def _load_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    config = load_config_json(path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LOHA or LOKR")
    for key in ("r", "alpha"):
        value = config.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise AdapterError(f"{path}: {key} must be a positive number, got {value!r}")
    return config


def read_peft_lycoris_adapter(path: Path, allow_pickle: bool = False) -> Adapter:
    """A PEFT LoHa/LoKr folder (or its weights file) as the canonical Adapter of LoHa/LoKr modules."""

    folder = find_peft_folder(Path(path))
    if folder is None:
        raise AdapterError(f"{path}: no {CONFIG_NAME} found, so this is not a PEFT adapter")
    config = _load_config(folder)
    algorithm, cls, source_format = PEFT_TYPES[str(config["peft_type"]).upper()]
    weights_path = _weights_file(folder, Path(path))
    with open_checkpoint(weights_path, allow_pickle=allow_pickle, quantized=False) as checkpoint:
        state = {name: checkpoint.read(name) for name in checkpoint}
    foreign = [k for k in state if not k.startswith(KEY_PREFIX)]
    if foreign:
        raise AdapterError(f"{weights_path}: keys without the PEFT prefix {KEY_PREFIX!r}: {summarize(foreign)}")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = key[len(KEY_PREFIX):]
        split = split_key(key)
        if split is not None and split[1] in cls.roles:
            groups.setdefault(split[0], {})[split[1]] = tensor
        elif key.endswith((".weight", ".bias")) and (split is None or split[1] in ("weight", "bias")):
            full[key.replace(".base_layer.", ".")] = tensor  # modules_to_save, or a saved base layer
        else:
            raise AdapterError(f"{weights_path}: {key!r} is not a {config['peft_type']} tensor")
    if not groups:
        raise AdapterError(f"{weights_path}: holds no {config['peft_type']} tensors")
    problems: list[str] = []
    modules = {}
    for name, parts in sorted(groups.items()):
        rank = pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, config.get("alpha", 8)))
        try:
            module = _peft_module(cls, name, parts, alpha, rank)
        except AdapterError as e:
            problems.append(str(e))
            continue
        stored = [t.shape[0] for role, t in parts.items() if role in RANK_ROLES]
        if any(r != rank for r in stored):
            problems.append(f"{name}: rank {stored[0]} in the weights but r={rank} in the config")
            continue
        modules[name] = module
    if problems:
        raise AdapterError(f"{weights_path}: {summarize(problems)}")
    return Adapter(path=folder, source_format=source_format, modules=modules, full_tensors=full, config=config)


def _peft_module(cls, name: str, parts: dict[str, torch.Tensor], alpha: float, rank: int):
    """PEFT's scale is alpha/r for every module: LoKr's `dim` is r even when both halves are full."""
    if cls is LoHa:
        return LoHa.from_parts(name, parts, alpha, None)
    return LoKr(name, **{role.removeprefix("lokr_"): t for role, t in parts.items()}, alpha=alpha, dim=rank)


# -- writer ----------------------------------------------------------------------------------------

def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's LoKr split of a dimension into (m, n), m·n = dimension: (factor, dimension/factor) when
    factor divides it (unordered), else the divisor pair nearest the square root with m ≤ factor."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    for candidate in range(2, dimension + 1):
        if candidate >= n:
            break
        if dimension % candidate:
            continue
        if candidate + dimension // candidate > m + n or candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def _layer_shape(module) -> tuple[int, ...]:
    shape = tuple(module.expected_base_shape())
    if len(shape) not in (2, 4):
        raise AdapterError(f"{module.name}: PEFT's {module.algorithm} writer handles Linear and Conv2d layers, "
                           f"not a weight of shape {list(shape)}")
    return shape


def _spatial(shape) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def _loha_layout(modules: Mapping[str, LoHa]):
    """Tensors in PEFT's LoHa layout, ranks, and the config fields that make PEFT build that layout."""
    shapes = {name: _layer_shape(m) for name, m in modules.items()}
    spatial = [m for name, m in modules.items() if _spatial(shapes[name])]
    effective = bool(spatial) and all(m.tucker for m in spatial)
    tensors, ranks = {}, {}
    for name, m in modules.items():
        r = m.rank
        cores = [t for t in (m.t1, m.t2) if t is not None]
        if m.w2_b.shape[0] != r or any(tuple(t.shape[:2]) != (r, r) for t in cores):
            raise AdapterError(f"{name}: LoHa halves of different ranks; PEFT's LoHa has one rank r for both")
        if effective and _spatial(shapes[name]):
            tensors[name] = m.tensors()
        else:
            tensors[name] = {}
            for index, (t, a, b) in enumerate(m.halves(), start=1):
                if t is None:
                    left, right = a, b.reshape(r, -1)
                else:
                    left, right = (f.to(a.dtype) for f in tucker_to_flat(t.double(), a.double(), b.double()))
                tensors[name].update({f"hada_w{index}_a": left, f"hada_w{index}_b": right})
        ranks[name] = r
    return tensors, ranks, {"use_effective_conv2d": effective}


def _decompose_factor(modules: Mapping[str, LoKr], shapes) -> int:
    """One `decompose_factor` under which PEFT splits every module's out and in dims as its w1 does."""
    def fits(factor: int) -> str | None:
        for name, m in modules.items():
            (a, c), (out, inp) = m.w1_shape, shapes[name][:2]
            if (peft_factorization(out, factor), peft_factorization(inp, factor)) != ((a, out // a), (c, inp // c)):
                return name
        return None

    dims = {d for name, m in modules.items() for d in (*m.w1_shape, *shapes[name][:2])}
    candidates = [-1, *sorted(dims - {0})]
    for factor in candidates:
        if fits(factor) is None:
            return factor
    name = fits(-1)
    raise AdapterError(f"{name}: no PEFT decompose_factor reproduces its Kronecker split w1 "
                       f"{list(modules[name].w1_shape)} of a {list(shapes[name])} weight together with the other "
                       "modules' splits")


def _lokr_layout(modules: Mapping[str, LoKr]):
    import torch

    shapes = {name: _layer_shape(m) for name, m in modules.items()}
    for name, m in modules.items():
        (a, c), out, inp = m.w1_shape, *shapes[name][:2]
        if out % a or inp % c or m.natural_shape()[0] != out:
            raise AdapterError(f"{name}: LoKr w1 {list(m.w1_shape)} does not split a {list(shapes[name])} weight")
    factor = _decompose_factor(modules, shapes)
    plan = {}
    for name, m in modules.items():
        (a, c), (out, inp, *kernel) = m.w1_shape, shapes[name]
        b, d = out // a, inp // c
        if m.w2 is None:
            r = m.w2_b.shape[0]
        else:
            r = m.dim if m.dim and m.dim >= max(b, d) / 2 else math.ceil(max(b, d) / 2)
        w2_full = r >= max(b, d) / 2
        plan[name] = (r, (a, c), (b, d), kernel, w2_full)

    def w1_factored_ok(name, m) -> bool:
        r, (a, c), *_ = plan[name]
        peft_factored = r < max(a, c) / 2
        return peft_factored == (m.w1 is None) and (m.w1 is not None or m.w1_b.shape[0] == r)

    decompose_both = (any(m.w1 is None for m in modules.values())
                      and all(w1_factored_ok(name, m) for name, m in modules.items()))
    factored_spatial = [m for name, m in modules.items() if _spatial(shapes[name]) and not plan[name][4]]
    effective = bool(factored_spatial) and all(m.tucker for m in factored_spatial)
    tensors, ranks = {}, {}
    for name, m in modules.items():
        r, (a, c), (b, d), kernel, w2_full = plan[name]
        dtype = next(iter(m.tensors().values())).dtype
        out: dict[str, torch.Tensor] = {}
        if decompose_both and m.w1 is None:
            out.update(lokr_w1_a=m.w1_a, lokr_w1_b=m.w1_b)
        else:
            out["lokr_w1"] = m.full_w1(torch.float64, "cpu").to(dtype)
        if w2_full:
            out["lokr_w2"] = m.full_w2(torch.float64, "cpu").reshape(b, d, *kernel).to(dtype)
        elif m.tucker and effective and _spatial(shapes[name]):
            out.update(lokr_w2_a=m.w2_a, lokr_w2_b=m.w2_b, lokr_t2=m.t2)
        elif m.tucker:
            left, right = tucker_to_flat(m.t2.double(), m.w2_a.double(), m.w2_b.double())
            out.update(lokr_w2_a=left.to(dtype), lokr_w2_b=right.to(dtype))
        else:
            out.update(lokr_w2_a=m.w2_a, lokr_w2_b=m.w2_b.reshape(r, -1))
        tensors[name], ranks[name] = out, r
    return tensors, ranks, {"decompose_both": decompose_both, "decompose_factor": factor,
                            "use_effective_conv2d": effective, "rank_dropout_scale": False}


def _scaling_fields(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict:
    """`r`, `alpha` and the patterns giving each module its rank and alpha (most common as defaults)."""
    r = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    return {"r": r, "alpha": _number(alpha),
            "rank_pattern": {name: v for name, v in sorted(ranks.items()) if v != r},
            "alpha_pattern": {name: _number(v) for name, v in sorted(alphas.items()) if v != alpha}}


def write_peft_lycoris_adapter(folder: Path, modules: Mapping[str, LoHa | LoKr],
                               full_tensors: Mapping[str, torch.Tensor | LazyTensor], config: dict,
                               dtype: torch.dtype | None = None) -> list[Path]:
    """Write a PEFT LoHa or LoKr folder (`adapter_config.json` + `adapter_model.safetensors`) into an
    existing `folder`, for modules that are all LoHa or all LoKr. `PeftModel.from_pretrained` loads it
    and its merge equals each module's `delta()`. `config` supplies the rest (base model, task type,
    `target_modules`, default: the module names); the layout and scaling fields are derived here.

    Conv modules from LyCORIS files that keep the kernel flattened must be `fit_to` their base first,
    or they are written as Linear layers.
    """

    classes = {type(m) for m in modules.values()}
    if classes not in ({LoHa}, {LoKr}):
        names = sorted({m.algorithm for m in modules.values()})
        raise AdapterError("a PEFT LoHa/LoKr folder holds modules of one algorithm, loha or lokr; "
                           f"got {', '.join(names)}")
    dora = [name for name, m in modules.items() if m.is_dora]
    if dora:
        raise AdapterError(f"{summarize(dora)}: PEFT's LoHa/LoKr have no DoRA (weight decomposition)")
    peft_type = "LOHA" if classes == {LoHa} else "LOKR"
    tensors, ranks, layout = (_loha_layout if peft_type == "LOHA" else _lokr_layout)(modules)
    alphas = {name: modules[name].scale * r for name, r in ranks.items()}
    full_config = {
        "peft_type": peft_type, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "target_modules": sorted(modules),
        **config, **layout, **_scaling_fields(ranks, alphas),
    }
    full_config["peft_type"] = peft_type
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    state: dict[str, torch.Tensor | LazyTensor] = {
        f"{KEY_PREFIX}{name}.{role}": cast(t).detach().to("cpu").contiguous()
        for name, parts in sorted(tensors.items()) for role, t in parts.items()}
    for name, tensor in sorted(full_tensors.items()):
        module, _, param = name.rpartition(".")
        key = f"{module}.base_layer.{param}" if module in modules else name
        state[KEY_PREFIX + key] = tensor if isinstance(tensor, LazyTensor) else tensor.detach().to("cpu").contiguous()
    weights = Path(folder) / WEIGHTS_NAME
    write_safetensors(weights, state)
    config_path = Path(folder) / CONFIG_NAME
    config_path.write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")
    return [config_path, weights]
