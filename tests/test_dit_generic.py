"""Diffusion transformers without a family table: a native file (Wan-shaped names here) bare or as
ComfyUI saves it, and LoRAs in the dialects trainers write for them (musubi/kohya flattened,
ComfyUI/diffusion-pipe `diffusion_model.` + `lora_A`/`lora_B` with or without `.alpha`, Mochi's `.lora_B`
without `.weight`, bf16 alphas); `--skip-missing` for a LoRA with modules the base lacks. Every merge
is compared with float64 W + s·B@A computed here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_refused, ok, rel

DIM = 8
MODULES = ("blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.ffn.0", "head.head")


def wan_like(prefix: str = "") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {f"{prefix}{m}.weight": torch.randn(DIM, DIM, generator=generator) for m in MODULES}
    state.update({f"{prefix}{m}.bias": torch.randn(DIM, generator=generator) for m in MODULES})
    state[f"{prefix}patch_embedding.weight"] = torch.randn(DIM, 4, 1, 2, 2, generator=generator)
    return state


def lora(dialect: str, modules=MODULES, rank: int = 2, alpha: float | None = 1.0, seed: int = 1):
    """The file, and module -> float64 ΔW as the dialect's readers (ComfyUI) apply it."""
    generator = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for module in modules:
        down, up = torch.randn(rank, DIM, generator=generator), torch.randn(DIM, rank, generator=generator)
        if dialect == "musubi":
            name, a, b = "lora_unet_" + module.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif dialect == "mochi":
            name, a, b = "diffusion_model." + module, "lora_A", "lora_B"
        else:
            name, a, b = "diffusion_model." + module, "lora_A.weight", "lora_B.weight"
        state[f"{name}.{a}"], state[f"{name}.{b}"] = down, up
        scale = 1.0
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
            scale = float(torch.tensor(alpha, dtype=torch.bfloat16)) / rank
        deltas[module] = up.double() @ down.double() * scale
    return state, deltas


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("dialect,alpha", [("musubi", 1.0), ("comfyui", 1.0), ("comfyui", None), ("mochi", 4.0)])
def test_native_dit_merges_every_dialect(run_cli, tmp_path, prefix, dialect, alpha):
    base = wan_like(prefix)
    save_file(base, str(tmp_path / "wan.safetensors"))
    state, deltas = lora(dialect, alpha=alpha)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", tmp_path / "wan.safetensors", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    for key, tensor in base.items():
        module = key.removeprefix(prefix).rsplit(".", 1)[0]
        expected = tensor.double() + (deltas[module] if key.endswith(".weight") and module in deltas else 0)
        assert rel(merged[key], expected) < 1e-6, key
    if prefix:  # ComfyUI's saved DiT is not an SD UNet
        report = json.loads(ok(run_cli("inspect", tmp_path / "wan.safetensors", "--json")).stdout)
        assert report["layout"] == "dit-native"


def test_a_lora_spelled_twice_is_refused(run_cli, tmp_path):
    save_file(wan_like(), str(tmp_path / "wan.safetensors"))
    state, _ = lora("comfyui", modules=MODULES[:1])
    state["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = state[
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight"].clone()
    save_file(state, str(tmp_path / "twice.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", tmp_path / "wan.safetensors", tmp_path / "twice.safetensors", "-o", out), out,
                   "two spellings", "blocks.0.self_attn.q.lora_down.weight")


def test_skip_missing_is_a_decision(run_cli, tmp_path):
    """An I2V LoRA's k_img/v_img on a T2V base: refused by default, with the count and the way out;
    with --skip-missing the rest merges exactly and the skipped modules are listed."""
    save_file(wan_like(), str(tmp_path / "t2v.safetensors"))
    state, deltas = lora("musubi", modules=(*MODULES[:2], "blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img"))
    save_file(state, str(tmp_path / "i2v.safetensors"))
    out = tmp_path / "m.safetensors"
    line = assert_refused(run_cli("merge", tmp_path / "t2v.safetensors", tmp_path / "i2v.safetensors", "-o", out), out,
                          "2 module(s)", "k_img", "--skip-missing")
    assert "v_img" in line
    report = json.loads(ok(run_cli("merge", tmp_path / "t2v.safetensors", tmp_path / "i2v.safetensors", "-o", out,
                                   "--skip-missing", "--json")).stdout)
    assert [s.rsplit(": ", 1)[1] for s in report["skipped"]] == ["lora_unet_blocks_0_cross_attn_k_img",
                                                                 "lora_unet_blocks_0_cross_attn_v_img"]
    assert any("--skip-missing: 2 module(s)" in note for note in report["notes"])
    merged, base = load_file(str(out)), wan_like()
    for module in MODULES[:2]:
        assert rel(merged[f"{module}.weight"], base[f"{module}.weight"].double() + deltas[module]) < 1e-6
    assert torch.equal(merged["head.head.weight"], base["head.head.weight"])
    nothing, _ = lora("musubi", modules=("blocks.0.cross_attn.k_img",))
    save_file(nothing, str(tmp_path / "none.safetensors"))
    assert_refused(run_cli("merge", tmp_path / "t2v.safetensors", tmp_path / "none.safetensors", "-o", out,
                           "--skip-missing", "--force"), None, "none of its 1 modules")


def test_a_base_saved_under_diffusion_model_is_a_checkpoint(run_cli, tmp_path):
    save_file(wan_like("diffusion_model."), str(tmp_path / "wan.safetensors"))
    report = json.loads(ok(run_cli("inspect", tmp_path / "wan.safetensors", "--json")).stdout)
    assert report["kind"] == "checkpoint" and report["layout"] == "dit-native"


def test_nothing_resolves_names_the_families_tried(run_cli, tmp_path):
    save_file(wan_like("model.diffusion_model."), str(tmp_path / "dit.safetensors"))
    state, _ = lora("musubi", modules=("double_blocks.0.img_attn.qkv",))
    save_file(state, str(tmp_path / "flux_lora.safetensors"))
    out = tmp_path / "m.safetensors"
    line = assert_refused(run_cli("merge", tmp_path / "dit.safetensors", tmp_path / "flux_lora.safetensors", "-o", out),
                          out, "lora_unet_double_blocks_0_img_attn_qkv", "no family table matched", "Flux", "Wan")
    assert "dit-native" in line
    text = ok(run_cli("inspect", tmp_path / "dit.safetensors")).stdout
    assert "dit-native" in text
