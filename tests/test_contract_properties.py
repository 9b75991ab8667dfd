"""The bad-input contract, property-based: for every algorithm and dialect, a generated adapter module
(valid, or broken in one way) merged into a tiny Flux file and converted to LoRA against it. Either the
command refuses with exit 2 and one `Error:` line, or it exits 0 with the float64 oracle's result. It
never exits 1, never writes NaN, never applies a ΔW twice, and never modifies its inputs.

The oracle is written here from the algorithms' published formulas (LoRA: s·up@down; LoHa:
(w1a@w1b)⊙(w2a@w2b)·alpha/r; LoKr: kron(w1, w2a@w2b)·alpha/r; full: diff), in float64.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import rel

WIDTH = 8
#: BFL module -> (base tensor, its shape). qkv is fused: a LoRA on it is split into three row pieces.
TARGETS = {
    "double_blocks.0.img_attn.qkv": (3 * WIDTH, WIDTH),
    "single_blocks.0.linear2": (WIDTH, 5 * WIDTH),
    "final_layer.adaLN_modulation.1": (2 * WIDTH, WIDTH),
}
DIALECTS = {
    "kohya": lambda m: "lora_unet_" + m.replace(".", "_"),
    "lycoris": lambda m: "lycoris_" + m.replace(".", "_"),
    "comfyui": lambda m: "diffusion_model." + m,
}
ALGORITHMS = ("lora", "loha", "lokr", "full")
MUTATIONS = ("none", "negative_alpha", "nan_alpha", "inf_alpha", "huge_alpha", "fp8", "int", "zero_dim", "rank0",
             "drop", "wrong_dim", "duplicate", "fused_rows")
#: Mutations after which the module is still valid and must merge exactly.
VALID = {"none", "negative_alpha"}


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory) -> Path:
    generator = torch.Generator().manual_seed(0)
    shapes = {f"{m}.weight": s for m, s in TARGETS.items()}
    shapes.update({"double_blocks.0.img_attn.qkv.bias": (3 * WIDTH,), "single_blocks.0.linear1.weight": (7 * WIDTH, WIDTH),
                   "double_blocks.0.img_attn.norm.key_norm.scale": (WIDTH,)})
    path = tmp_path_factory.mktemp("flux") / "flux1.safetensors"
    save_file({k: torch.randn(s, generator=generator) for k, s in shapes.items()}, str(path))
    return path


def module_tensors(algorithm: str, shape: tuple[int, int], rank: int, generator) -> dict[str, torch.Tensor]:
    out, inp = shape
    rand = lambda *s: torch.randn(s, generator=generator) * 0.2  # noqa: E731
    if algorithm == "lora":
        return {"lora_down.weight": rand(rank, inp), "lora_up.weight": rand(out, rank)}
    if algorithm == "loha":
        return {"hada_w1_a": rand(out, rank), "hada_w1_b": rand(rank, inp), "hada_w2_a": rand(out, rank),
                "hada_w2_b": rand(rank, inp)}
    if algorithm == "lokr":  # w1 (2, 2) full, w2 factored: (out/2, r) @ (r, in/2)
        return {"lokr_w1": rand(2, 2), "lokr_w2_a": rand(out // 2, rank), "lokr_w2_b": rand(rank, inp // 2)}
    return {"diff": rand(out, inp)}


def oracle_delta(algorithm: str, parts: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    p = {k: v.double() for k, v in parts.items()}
    if algorithm == "lora":
        rank = p["lora_down.weight"].shape[0]
        return p["lora_up.weight"] @ p["lora_down.weight"] * (alpha if alpha is not None else rank) / rank
    if algorithm == "loha":
        rank = p["hada_w1_b"].shape[0]
        scale = (alpha if alpha is not None else rank) / rank
        return (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * scale
    if algorithm == "lokr":
        rank = p["lokr_w2_b"].shape[0]
        scale = (alpha if alpha is not None else rank) / rank
        return torch.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]) * scale
    return p["diff"]


def mutate(mutation: str, algorithm: str, parts: dict[str, torch.Tensor], alpha: float | None):
    """The module's tensors and alpha after one mutation (`fused_rows` and `duplicate` act on names)."""
    parts = dict(parts)
    first = next(iter(parts))
    if mutation == "negative_alpha":
        alpha = -abs(alpha or 1.0)
    elif mutation == "nan_alpha":
        alpha = math.nan
    elif mutation == "inf_alpha":
        alpha = math.inf
    elif mutation == "huge_alpha":
        alpha = 1e30
    elif mutation == "fp8":
        parts[first] = parts[first].to(torch.float8_e4m3fn)
    elif mutation == "int":
        parts[first] = (parts[first] * 10).to(torch.int32)
    elif mutation == "zero_dim":
        parts[first] = parts[first].reshape(-1)[0].clone()
    elif mutation == "rank0":
        parts[first] = parts[first][:0] if algorithm != "full" else parts[first][:, :0]
    elif mutation == "drop":
        if len(parts) == 1:
            parts = {"diff_b": torch.zeros(3)}  # a full diff's bias without its weight
        else:
            del parts[first]
    elif mutation == "wrong_dim":
        last = list(parts)[-1]
        t = parts[last]
        parts[last] = torch.cat([t, t[..., :1]], dim=-1)
    return parts, alpha


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_refusal(result) -> None:
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(sorted(TARGETS)), dialect=st.sampled_from(sorted(DIALECTS)), rank=st.integers(1, 3),
       alpha=st.one_of(st.none(), st.floats(0.25, 8)), seed=st.integers(0, 2**16))
def test_merge_and_convert_keep_the_contract(run_cli, flux_base, algorithm, mutation, target, dialect, rank, alpha,
                                              seed):
    if algorithm == "full":
        alpha = None if mutation not in ("nan_alpha", "inf_alpha", "huge_alpha", "negative_alpha") else alpha
    generator = torch.Generator().manual_seed(seed)
    shape = TARGETS[target]
    rows = shape[0] + (1 if seed % 2 else -1) * (2 if algorithm == "lokr" else 1)
    if mutation == "fused_rows":
        if target != "double_blocks.0.img_attn.qkv":
            mutation = "none"
        else:
            shape = (rows, shape[1])
    parts = module_tensors(algorithm, shape, rank, generator)
    parts, alpha = mutate(mutation, algorithm, parts, alpha)
    name = DIALECTS[dialect](target)
    state = {f"{name}.{role}": t for role, t in parts.items()}
    if alpha is not None:
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if mutation == "duplicate":  # the same module again under another dialect's name
        other = DIALECTS[next(d for d in sorted(DIALECTS) if d != dialect)](target)
        state.update({k.replace(name, other, 1): v.clone() for k, v in state.items()})

    work = Path(tempfile.mkdtemp(dir=flux_base.parent))
    adapter = work / "adapter.safetensors"
    save_file(state, str(adapter))
    before = (digest(flux_base), digest(adapter))
    merged = run_cli("merge", flux_base, adapter, "-o", work / "merged.safetensors")
    converted = run_cli("convert", adapter, "--to", "peft", "--rank", "4", "--base", flux_base, "-o", work / "peft")
    assert (digest(flux_base), digest(adapter)) == before, "an input was modified"
    assert merged.code in (0, 2) and converted.code in (0, 2), (merged, converted)
    assert merged.code == converted.code, ("merge and convert disagree", merged, converted)

    # a full diff has no scale: a finite alpha beside it is ignored, a non-finite one is still refused
    ignored = algorithm == "full" and mutation in ("negative_alpha", "huge_alpha")
    if mutation not in VALID and not ignored:
        check_refusal(merged)
        check_refusal(converted)
        assert not (work / "merged.safetensors").exists() and not (work / "peft").exists()
        return
    assert merged.code == 0, merged
    out = load_file(str(work / "merged.safetensors"))
    base = load_file(str(flux_base))
    for key, tensor in out.items():
        assert torch.isfinite(tensor).all(), key
        expected = base[key].double()
        if key == f"{target}.weight":
            expected = expected + oracle_delta(algorithm, parts, alpha if algorithm != "full" else None)
        assert rel(tensor, expected) < 1e-6, (key, mutation)
