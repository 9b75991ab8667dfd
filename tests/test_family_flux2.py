"""Flux.2 (`layouts/flux2.py`): the BFL names against diffusers' own single-file converter, detection of
the BFL file (bare, as ComfyUI saves it) and the diffusers one apart from Flux.1, LoRAs in every
trainer dialect merged into both and compared with float64 W + s·B@A and with diffusers' own LoRA
paths (and where those are wrong: `.alpha` refused, modulations and `final_layer.adaLN_modulation`
dropped), lossless convert round trips, and --skip-missing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_family_tools import (check_convert_round_trip, check_dialect_merge, DIFFUSERS_DIALECTS, expected_merge,
                              lora_state, NATIVE_DIALECTS, native_state, peft_fused, pipeline_folder, row_map)
from helpers import assert_refused, ok, rel
from loratool.layouts import flux2

LDM = "model.diffusion_model."
H = 16  # 2 heads of 8; the MLP is 3H wide (SwiGLU: linear_in is 2·3H)


def tiny_flux2(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=8,
                                   axes_dims_rope=(2, 2, 2, 2)).eval()


def converter(state):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(dict(state))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux2")
    diffusers = {k: v.detach().clone() for k, v in tiny_flux2().state_dict().items()}
    native = native_state(diffusers, flux2.FAMILY)
    save_file(diffusers, str(folder / "diffusers.safetensors"))
    save_file(native, str(folder / "native.safetensors"))
    save_file({LDM + k: v for k, v in native.items()}, str(folder / "comfy.safetensors"))
    save_file({"diffusion_model." + k: v for k, v in native.items()}, str(folder / "dm.safetensors"))
    return folder, diffusers, native, row_map(native, converter)


def test_native_names_come_from_diffusers_converter(files):
    _, diffusers, native, rows = files
    converted = converter(native)
    assert set(converted) == set(diffusers)
    assert all(torch.equal(converted[k], diffusers[k]) for k in diffusers)
    assert "double_blocks.0.img_attn.qkv.weight" in native and "single_blocks.0.linear1.weight" in native
    # norm_out's halves are swapped: diffusers (scale, shift), BFL (shift, scale)
    assert [row for _, row in rows["norm_out.linear.weight"]] == [*range(H, 2 * H), *range(H)]


def inspect_json(run_cli, path):
    return json.loads(ok(run_cli("inspect", path, "--json")).stdout)


NATIVE_MODULES = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.1.txt_attn.qkv": (3 * H, H),
                  "double_blocks.0.img_mlp.0": (6 * H, H), "single_blocks.1.linear1": (9 * H, H),
                  "single_blocks.0.linear2": (H, 4 * H), "double_stream_modulation_img.lin": (6 * H, H),
                  "single_stream_modulation.lin": (3 * H, H), "final_layer.adaLN_modulation.1": (2 * H, H),
                  "final_layer.linear": (4, H)}
DIFFUSERS_MODULES = {"transformer_blocks.0.attn.to_k": (H, H), "transformer_blocks.1.attn.add_v_proj": (H, H),
                     "transformer_blocks.1.ff_context.linear_out": (H, 3 * H),
                     "single_transformer_blocks.0.attn.to_qkv_mlp_proj": (9 * H, H),
                     "single_transformer_blocks.1.attn.to_out": (H, 4 * H),
                     "double_stream_modulation_txt.linear": (6 * H, H), "norm_out.linear": (2 * H, H),
                     "proj_out": (4, H)}


def test_inspect_tells_flux2_from_flux(run_cli, files, tmp_path):
    folder = files[0]
    for name, layout in (("native", "flux2-bfl"), ("comfy", "flux2-bfl"), ("diffusers", "flux2-diffusers")):
        report = inspect_json(run_cli, folder / f"{name}.safetensors")
        assert (report["layout"], report["family"]) == (layout, "Flux.2"), name
    for dialect in NATIVE_DIALECTS + DIFFUSERS_DIALECTS:
        state, _ = lora_state(dialect, NATIVE_MODULES if dialect in NATIVE_DIALECTS else DIFFUSERS_MODULES, seed=1)
        save_file(state, str(tmp_path / f"{dialect}.safetensors"))
        assert inspect_json(run_cli, tmp_path / f"{dialect}.safetensors")["family"] == "Flux.2", dialect
    # blocks only: Flux.1 has the same names, so only metadata tells; Flux.1's own metadata still says Flux
    blocks = {"double_blocks.0.img_attn.qkv": (3 * H, H)}
    for version, family in (("flux2", "Flux.2"), ("flux1", "Flux")):
        state, _ = lora_state("musubi", blocks, seed=1)
        save_file(state, str(tmp_path / "meta.safetensors"), metadata={"ss_base_model_version": version})
        report = inspect_json(run_cli, tmp_path / "meta.safetensors")
        assert (report["family"], report["family_from"]) == (family, "metadata"), version


@pytest.mark.parametrize("into", ["native", "comfy", "dm", "diffusers"])
@pytest.mark.parametrize("dialect", NATIVE_DIALECTS + DIFFUSERS_DIALECTS)
def test_every_dialect_merges_into_either_naming(run_cli, files, tmp_path, dialect, into):
    folder, diffusers, native, rows = files
    native_names = dialect in NATIVE_DIALECTS
    check_dialect_merge(run_cli, folder, diffusers, native, rows, tmp_path, dialect,
                        NATIVE_MODULES if native_names else DIFFUSERS_MODULES, native_names, into)


def flux2_fused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return peft_fused(tiny_flux2(), state)


def merged_into_diffusers(run_cli, files, tmp_path, state) -> dict[str, torch.Tensor]:
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", files[0] / "diffusers.safetensors", tmp_path / "lora.safetensors", "-o",
               tmp_path / "m.safetensors"))
    return load_file(str(tmp_path / "m.safetensors"))


#: What diffusers' Flux.2 LoRA converters read: the blocks and the embedders, not the modulations.
BLOCK_MODULES = {k: v for k, v in NATIVE_MODULES.items() if k.startswith(("double_blocks", "single_blocks"))
                 or k == "final_layer.linear"}


def test_kohya_lora_matches_diffusers_own_path(run_cli, files, tmp_path):
    """A kohya Flux.2 LoRA through diffusers' kohya-Flux.2 converter, PEFT and fuse, against our merge.
    That converter drops the shared modulations, `final_layer.adaLN_modulation.1` and `guidance_in` (a
    warning, and the modules are left unmerged); loratool merges them (float64-checked above)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    state, _ = lora_state("musubi", BLOCK_MODULES, seed=3)
    ours = merged_into_diffusers(run_cli, files, tmp_path, state)
    theirs = flux2_fused(_convert_kohya_flux2_lora_to_diffusers({k: v.clone() for k, v in state.items()}))
    assert set(ours) == set(theirs)
    for key in ours:
        assert rel(ours[key], theirs[key]) < 1e-6, key
    dropped, _ = lora_state("musubi", {**{m: NATIVE_MODULES[m] for m in (
        "double_stream_modulation_img.lin", "single_stream_modulation.lin", "final_layer.adaLN_modulation.1")},
        "guidance_in.in_layer": (H, 8)}, seed=3)
    assert _convert_kohya_flux2_lora_to_diffusers(dropped) == {}


def test_comfyui_lora_matches_diffusers_own_path(run_cli, files, tmp_path):
    """A ComfyUI / ai-toolkit Flux.2 LoRA (`diffusion_model.` + lora_A/lora_B) without `.alpha` through
    diffusers' converter, PEFT and fuse, against our merge; with `.alpha` diffusers' converter refuses the
    file (the alphas stay behind), loratool applies them (float64-checked above)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    modules = {**BLOCK_MODULES, **{m: NATIVE_MODULES[m] for m in ("double_stream_modulation_img.lin",
                                                                 "final_layer.adaLN_modulation.1")}}
    state, _ = lora_state("comfyui-noalpha", modules, seed=4)
    ours = merged_into_diffusers(run_cli, files, tmp_path, state)
    theirs = flux2_fused(_convert_non_diffusers_flux2_lora_to_diffusers(dict(state)))
    # diffusers copies final_layer.adaLN_modulation.1's B as it is, without swapping its halves into
    # norm_out.linear's (scale, shift) order: every other module agrees.
    for key in ours:
        if key != "norm_out.linear.weight":
            assert rel(ours[key], theirs[key]) < 1e-6, key
    base = files[1]["norm_out.linear.weight"].double()
    delta = state["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"].double() @ \
        state["diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight"].double()
    assert rel(ours["norm_out.linear.weight"], base + torch.cat([delta[H:], delta[:H]])) < 1e-6
    assert rel(theirs["norm_out.linear.weight"], base + delta) < 1e-6
    with pytest.raises(ValueError, match="should be empty"):
        _convert_non_diffusers_flux2_lora_to_diffusers(lora_state("comfyui", BLOCK_MODULES, seed=4)[0])


def test_convert_round_trips_losslessly(run_cli, files, tmp_path):
    """BFL names -> diffusers names against the BFL file (qkv split by rows, norm_out's halves swapped into
    diffusers' order) -> kohya names against the diffusers file: the same merge."""
    folder, _, _, rows = files
    check_convert_round_trip(run_cli, folder, rows, NATIVE_MODULES, tmp_path, seed=5,
                             parts=len(NATIVE_MODULES) + 2 * sum(k.endswith("qkv") for k in NATIVE_MODULES))


def test_a_flux1_lora_on_flux2_needs_skip_missing(run_cli, files, tmp_path):
    """Flux.1's per-block modulations (`img_mod.lin`, `modulation.lin`) are not in Flux.2: refused in one
    line, or merged without them."""
    folder, _, native, _ = files
    modules = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.img_mod.lin": (6 * H, H),
               "single_blocks.0.modulation.lin": (3 * H, H)}
    state, deltas = lora_state("musubi", modules, seed=6)
    save_file(state, str(tmp_path / "flux1.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", folder / "native.safetensors", tmp_path / "flux1.safetensors", "-o", out), out,
                   "2 module(s)", "img_mod", "--skip-missing")
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "flux1.safetensors", "-o", out, "--skip-missing"))
    key = "double_blocks.0.img_attn.qkv.weight"
    assert rel(load_file(str(out))[key], native[key].double() + deltas["double_blocks.0.img_attn.qkv"]) < 1e-6


def test_pipeline_folder(run_cli, files, tmp_path):
    """A Flux2Pipeline folder: named Flux.2, a BFL-named LoRA merges into `transformer/`."""
    _, diffusers, _, rows = files
    folder = pipeline_folder(tmp_path / "pipe", "Flux2Pipeline", "Flux2Transformer2DModel", diffusers)
    assert inspect_json(run_cli, folder)["family"] == "Flux.2"
    state, deltas = lora_state("musubi", NATIVE_MODULES, seed=7)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder, tmp_path / "lora.safetensors", "-o", tmp_path / "out"))
    merged = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    expected = expected_merge(diffusers, deltas, rows, native_base=False, native_names=True)
    assert all(rel(merged[k], v) < 1e-6 for k, v in expected.items())
