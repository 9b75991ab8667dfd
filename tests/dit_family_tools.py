"""Shared by the DiT family tests: a native single file written from a
tiny diffusers model with a family's table, the row map diffusers' own converter implies, and LoRAs in
every trainer dialect with their float64 ΔW."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loratool.layouts.dit import DitFamily

WEIGHT = ".weight"


def flat(name: str) -> str:
    return name.replace(".", "_")


def _native_param(module: str, param: str, tensor: torch.Tensor, family: DitFamily, has_bias: bool) -> str:
    """Norm weights (1-D, no bias, a `norm` in the name) take the family's native parameter name."""
    if param == "weight" and tensor.dim() == 1 and not has_bias and "norm" in module:
        return family.norm_param
    return param


def native_state(diffusers: dict[str, torch.Tensor], family: DitFamily) -> dict[str, torch.Tensor]:
    """The native single file of a diffusers state dict, read off the family's table: fused native
    tensors are their diffusers parts concatenated by rows in the table's order, swapped halves
    swapped; modules the table does not name keep their names."""
    modules = {k[: -len(WEIGHT)] for k in diffusers if k.endswith(WEIGHT)}
    groups = family.diffusers_groups(modules)
    covered = {part for parts in groups.values() for part in parts}
    native: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        for param in ("weight", "bias"):
            keys = [f"{p}.{param}" for p in parts]
            if not all(k in diffusers for k in keys):
                continue
            tensor = torch.cat([diffusers[k] for k in keys])
            if name in family.swapped_halves:
                tensor = torch.cat(tensor.chunk(2)[::-1])
            has_bias = f"{parts[0]}.bias" in diffusers
            native[f"{name}.{_native_param(name, param, tensor, family, has_bias)}"] = tensor
    for key, tensor in diffusers.items():
        module, _, param = key.rpartition(".")
        if module in covered:
            continue
        if not module:
            native[key] = tensor
            continue
        native[f"{module}.{_native_param(module, param, tensor, family, f'{module}.bias' in diffusers)}"] = tensor
    return native


def row_map(native: dict[str, torch.Tensor], convert) -> dict[str, list[tuple[str, int]]]:
    """diffusers weight key -> for each of its rows, the (native key, row) it came from, as diffusers'
    own converter `convert` moves them: every native row is tagged with a unique float64 code."""
    names = sorted(native)
    tagged = {}
    for i, key in enumerate(names):
        rows = native[key].shape[0] if native[key].dim() else 1
        code = i * 1_000_000 + torch.arange(rows, dtype=torch.float64)
        tagged[key] = code.reshape(-1, *([1] * (native[key].dim() - 1))).expand(native[key].shape).clone()
    converted = convert(tagged)
    found = {}
    for key, tensor in converted.items():
        if not key.endswith(WEIGHT) or tensor.dim() < 2:
            continue
        codes = tensor.reshape(tensor.shape[0], -1)[:, 0].long().tolist()
        found[key] = [(names[c // 1_000_000], c % 1_000_000) for c in codes]
    return found


def lora_state(dialect: str, modules: dict[str, tuple[int, int]], seed: int, rank: int = 2, alpha: float = 3.0):
    """A LoRA in `dialect` on `modules` (name in the dialect's naming -> weight shape (out, in)), and
    name -> float64 ΔW as sd-scripts / ComfyUI / PEFT apply it.

    Dialects: musubi (`lora_unet_` + flattened native names, `.alpha`), musubi-bf16 (bf16 `.alpha`),
    comfyui (`diffusion_model.` + `lora_A.weight`/`lora_B.weight` + `.alpha`), comfyui-noalpha (scale 1),
    mochi (`.lora_A`/`.lora_B` without `.weight`), diffusers (`transformer.` + lora_A/B, scale 1),
    onetrainer (`lora_transformer_` + flattened diffusers names), lycoris-lora / lycoris-loha /
    lycoris-lokr (SimpleTuner's `lycoris_` + flattened diffusers names)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    state, deltas = {}, {}
    for module, (out, fan_in) in modules.items():
        scale = alpha / rank
        if dialect.startswith("lycoris-"):
            name = "lycoris_" + flat(module)
            state[f"{name}.alpha"] = torch.tensor(alpha)
            if dialect == "lycoris-loha":
                w1a, w1b, w2a, w2b = rand(out, rank), rand(rank, fan_in), rand(out, rank), rand(rank, fan_in)
                state.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b,
                              f"{name}.hada_w2_a": w2a, f"{name}.hada_w2_b": w2b})
                deltas[module] = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * scale
            elif dialect == "lycoris-lokr":
                w1 = rand(2, 2)
                w2a, w2b = rand(out // 2, rank), rand(rank, fan_in // 2)
                state.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b})
                deltas[module] = torch.kron(w1.double(), w2a.double() @ w2b.double()) * scale
            else:
                down, up = rand(rank, fan_in), rand(out, rank)
                state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
                deltas[module] = up.double() @ down.double() * scale
            continue
        down, up = rand(rank, fan_in), rand(out, rank)
        if dialect in ("musubi", "musubi-bf16", "onetrainer"):
            prefix = "lora_transformer_" if dialect == "onetrainer" else "lora_unet_"
            name, a, b = prefix + flat(module), "lora_down.weight", "lora_up.weight"
        elif dialect == "mochi":
            name, a, b = "diffusion_model." + module, "lora_A", "lora_B"
        elif dialect == "diffusers":
            name, a, b = "transformer." + module, "lora_A.weight", "lora_B.weight"
        else:
            name, a, b = "diffusion_model." + module, "lora_A.weight", "lora_B.weight"
        state[f"{name}.{a}"], state[f"{name}.{b}"] = down, up
        if dialect in ("diffusers", "comfyui-noalpha"):
            scale = 1.0
        else:
            value = torch.tensor(alpha, dtype=torch.bfloat16 if dialect == "musubi-bf16" else torch.float32)
            state[f"{name}.alpha"] = value
            scale = float(value) / rank
        deltas[module] = up.double() @ down.double() * scale
    return state, deltas


#: Dialects that name modules in the model's own (native) names, and in diffusers' names.
NATIVE_DIALECTS = ("musubi", "musubi-bf16", "comfyui", "comfyui-noalpha", "mochi")
DIFFUSERS_DIALECTS = ("diffusers", "onetrainer", "lycoris-lora", "lycoris-loha", "lycoris-lokr")


def expected_merge(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], rows: dict, native_base: bool,
                   native_names: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """float64 W + ΔW for every base tensor, each ΔW placed by the converter's row map `rows`: a
    diffusers-named ΔW into the native rows its rows came from, a native-named ΔW into the diffusers
    tensors made of its rows."""
    expected = {k: v.double().clone() for k, v in base.items()}
    for module, delta in deltas.items():
        if native_names == native_base:
            expected[f"{prefix}{module}{WEIGHT}"] += delta
            continue
        if native_base:  # diffusers-named ΔW into the native rows
            for row, (key, native_row) in enumerate(rows[f"{module}{WEIGHT}"]):
                expected[prefix + key][native_row] += delta[row]
        else:  # native-named ΔW into each diffusers tensor built from its rows
            hits = 0
            for key, sources in rows.items():
                for row, (native_key, native_row) in enumerate(sources):
                    if native_key == f"{module}{WEIGHT}":
                        expected[prefix + key][row] += delta[native_row]
                        hits += 1
            assert hits == delta.shape[0], module
    return expected


def deltas_of(path) -> dict[str, torch.Tensor]:
    """Module -> float64 ΔW of a kohya or diffusers-named LoRA file: kohya's `.alpha` (none means r), or
    PEFT's lora_alpha / alpha_pattern in diffusers' `lora_adapter_metadata`."""
    state = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        config = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    found = {}
    for key in state:
        for a, b in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(a):
                module = key[: -len(a)]
                down, up = state[key].double(), state[module + b].double()
                alpha = state.get(f"{module}.alpha")
                if alpha is None and config:
                    inner = module.removeprefix("transformer.")
                    alpha = config.get("transformer.alpha_pattern", {}).get(inner, config["transformer.lora_alpha"])
                found[module] = up @ down * (1.0 if alpha is None else float(alpha) / down.shape[0])
    return found


def pipeline_folder(folder, class_name: str, model_class: str, state: dict[str, torch.Tensor]):
    """A diffusers pipeline folder (`model_index.json` + `transformer/`) holding `state`."""
    from safetensors.torch import save_file

    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": class_name, "_diffusers_version": "0.42.1", "transformer": ["diffusers", model_class]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": model_class}))
    save_file(state, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    return folder


#: Where a family's test bases live beside each other: name -> the prefix its native names carry.
BASE_PREFIXES = {"native": "", "comfy": "model.diffusion_model.", "dm": "diffusion_model.", "diffusers": ""}


def check_dialect_merge(run_cli, folder, diffusers: dict, native: dict, rows: dict, tmp_path, dialect: str,
                        modules: dict[str, tuple[int, int]], native_names: bool, into: str) -> None:
    """A LoRA in `dialect` on `modules` merged into the base `into` (`<into>.safetensors` in `folder`)
    equals float64 W + ΔW on every tensor."""
    from safetensors.torch import save_file

    from helpers import ok, rel

    state, deltas = lora_state(dialect, modules, seed=2)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder / f"{into}.safetensors", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    base = diffusers if into == "diffusers" else native
    prefix = BASE_PREFIXES[into]
    expected = expected_merge({prefix + k: v for k, v in base.items()}, deltas, rows, into != "diffusers",
                              native_names, prefix)
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        assert rel(merged[key], tensor) < 1e-6, key


def check_convert_round_trip(run_cli, folder, rows: dict, native_modules: dict[str, tuple[int, int]], tmp_path,
                             seed: int, parts: int) -> None:
    """musubi -> `--to diffusers` against the native file splits into `parts` modules, each the rows of
    the native ΔW diffusers' converter gives it; -> `--to kohya` against the diffusers file keeps every
    module; both merge into the native file alike."""
    from safetensors.torch import save_file

    from helpers import ok, rel

    state, deltas = lora_state("musubi", native_modules, seed=seed)
    save_file(state, str(tmp_path / "musubi.safetensors"))
    ok(run_cli("convert", tmp_path / "musubi.safetensors", "--to", "diffusers", "--base", folder / "native.safetensors",
               "-o", tmp_path / "diffusers-lora.safetensors"))
    split = deltas_of(tmp_path / "diffusers-lora.safetensors")
    assert len(split) == parts
    for module, delta in split.items():
        sources = rows[module.removeprefix("transformer.") + WEIGHT]
        fused = deltas[sources[0][0].removesuffix(WEIGHT)]
        assert rel(delta, fused[[row for _, row in sources]]) < 1e-6, module
    ok(run_cli("convert", tmp_path / "diffusers-lora.safetensors", "--to", "kohya", "--base",
               folder / "diffusers.safetensors", "-o", tmp_path / "kohya.safetensors"))
    back = deltas_of(tmp_path / "kohya.safetensors")
    assert all(n.startswith("lora_unet_") for n in back) and len(back) == len(split)
    for out, lora in ((tmp_path / "a.safetensors", "musubi"), (tmp_path / "b.safetensors", "kohya")):
        ok(run_cli("merge", folder / "native.safetensors", tmp_path / f"{lora}.safetensors", "-o", out))
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(rel(a[k], b[k]) < 1e-6 for k in a)


def peft_fused(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own path: a converted (diffusers-named) LoRA injected into the tiny model with PEFT, and
    fused."""
    model.load_lora_adapter(state, prefix="transformer")
    model.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def spelled_lora(prefix: str, flat: bool, a_role: str | None, b_role: str | None, state: dict[str, torch.Tensor],
                 modules, alpha: float | None = 3.0, seed: int = 1, rank: int = 2):
    """(file tensors, {module: float64 ΔW}) for `modules` named `prefix` + the name (flattened when
    `flat`), with LoRA roles `a_role`/`b_role` (kohya's when None) and a bf16 `.alpha` unless `alpha` is
    None. Without roles, the modules are SimpleTuner's LyCORIS: they alternate LoKr (w2 factored), LoHa
    and LoRA."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    for i, module in enumerate(modules):
        out, fan_in = state[f"{module}.weight"].shape[:2]
        name = prefix + (module.replace(".", "_") if flat else module)
        scale = 1.0 if alpha is None else float(torch.tensor(alpha, dtype=torch.bfloat16)) / rank
        if a_role is None and i % 3 == 0:  # LoKr: kron(w1, w2_a @ w2_b)
            w1, w2a, w2b = randn(2, 2), randn(out // 2, rank), randn(rank, fan_in // 2)
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b})
            delta = torch.kron(w1.double(), w2a.double() @ w2b.double())
        elif a_role is None and i % 3 == 1:  # LoHa: (w1a @ w1b) * (w2a @ w2b)
            parts = {f"hada_w{k}_{ab}": randn(out, rank) if ab == "a" else randn(rank, fan_in) for k in (1, 2)
                     for ab in "ab"}
            tensors.update({f"{name}.{role}": t for role, t in parts.items()})
            d = {role: t.double() for role, t in parts.items()}
            delta = (d["hada_w1_a"] @ d["hada_w1_b"]) * (d["hada_w2_a"] @ d["hada_w2_b"])
        else:
            down, up = randn(rank, fan_in), randn(out, rank)
            a, b = (a_role, b_role) if a_role else ("lora_down.weight", "lora_up.weight")
            tensors[f"{name}.{a}"], tensors[f"{name}.{b}"] = down, up
            delta = up.double() @ down.double()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
        deltas[module] = delta * scale
    return tensors, deltas


NAMED_LORA_RANK = 2


def named_lora(dialect: str, modules, shapes: dict[str, tuple[int, int]], seed: int = 1):
    """(state, module -> float64 ΔW) of a rank-2 LoRA in `dialect` (musubi, comfyui, comfyui-no-alpha,
    mochi, diffusers, onetrainer, lycoris-loha, lycoris-lokr) on `modules`, named as the dialect names
    them (native names for musubi/ComfyUI/Mochi, diffusers names for the others) with `shapes` by name."""
    generator = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}

    def rand(*shape):
        return torch.randn(shape, generator=generator) * 0.5

    for module in modules:
        out_features, in_features = shapes[module]
        alpha = torch.tensor(3.0, dtype=torch.bfloat16)
        if dialect.startswith("lycoris"):
            name = "lycoris_" + flat(module)
            if dialect == "lycoris-loha":
                parts = {"hada_w1_a": rand(out_features, NAMED_LORA_RANK), "hada_w1_b": rand(NAMED_LORA_RANK, in_features),
                         "hada_w2_a": rand(out_features, NAMED_LORA_RANK), "hada_w2_b": rand(NAMED_LORA_RANK, in_features)}
                delta = (parts["hada_w1_a"].double() @ parts["hada_w1_b"].double()) * (
                    parts["hada_w2_a"].double() @ parts["hada_w2_b"].double())
            else:
                parts = {"lokr_w1": rand(2, 2), "lokr_w2_a": rand(out_features // 2, NAMED_LORA_RANK),
                         "lokr_w2_b": rand(NAMED_LORA_RANK, in_features // 2)}
                delta = torch.kron(parts["lokr_w1"].double(), parts["lokr_w2_a"].double() @ parts["lokr_w2_b"].double())
            state.update({f"{name}.{role}": t for role, t in parts.items()})
            state[f"{name}.alpha"] = alpha
            deltas[module] = delta * float(alpha) / NAMED_LORA_RANK
            continue
        down, up = rand(NAMED_LORA_RANK, in_features), rand(out_features, NAMED_LORA_RANK)
        scale = float(alpha) / NAMED_LORA_RANK
        if dialect == "musubi":
            name, a, b = "lora_unet_" + flat(module), "lora_down.weight", "lora_up.weight"
        elif dialect == "onetrainer":
            name, a, b = "lora_transformer_" + flat(module), "lora_down.weight", "lora_up.weight"
        elif dialect == "diffusers":
            name, a, b, scale, alpha = "transformer." + module, "lora_A.weight", "lora_B.weight", 1.0, None
        elif dialect == "mochi":
            name, a, b = "diffusion_model." + module, "lora_A", "lora_B"
        elif dialect == "comfyui-no-alpha":
            name, a, b, scale, alpha = "diffusion_model." + module, "lora_A.weight", "lora_B.weight", 1.0, None
        else:
            name, a, b = "diffusion_model." + module, "lora_A.weight", "lora_B.weight"
        state[f"{name}.{a}"], state[f"{name}.{b}"] = down, up
        if alpha is not None:
            state[f"{name}.alpha"] = alpha
        deltas[module] = up.double() @ down.double() * scale
    return state, deltas
