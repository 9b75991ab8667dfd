"""Chroma (`layouts/chroma.py`): the native names against diffusers' own single-file converter, detection
of the native file (bare, as ComfyUI saves it) and the diffusers one, LoRAs in every trainer dialect
merged into both and compared with float64 W + s·B@A and with diffusers' own LoRA path, lossless
convert round trips, and --skip-missing."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_family_tools import (check_convert_round_trip, check_dialect_merge, DIFFUSERS_DIALECTS, expected_merge,
                              lora_state, NATIVE_DIALECTS, native_state, peft_fused, pipeline_folder, row_map)
from helpers import assert_refused, ok, rel
from loratool.layouts import chroma

LDM = "model.diffusion_model."
H = 16  # 2 heads of 8
CONFIG = dict(in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
              approximator_hidden_dim=12, approximator_layers=2)


def converter(width: int):
    """diffusers' Chroma converter, with its hard-coded `inner_dim = 3072` (the split of `linear1`) set
    to the tiny model's width; every other line is diffusers' own."""
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {width}"), namespace)
    return lambda state: namespace["convert_chroma_transformer_checkpoint_to_diffusers"](dict(state))


def tiny_chroma(seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(**CONFIG).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chroma")
    model = tiny_chroma()
    diffusers = {k: v.detach().clone() for k, v in model.state_dict().items()}
    native = native_state(diffusers, chroma.FAMILY)
    save_file(diffusers, str(folder / "diffusers.safetensors"))
    save_file(native, str(folder / "native.safetensors"))
    save_file({LDM + k: v for k, v in native.items()}, str(folder / "comfy.safetensors"))
    save_file({"diffusion_model." + k: v for k, v in native.items()}, str(folder / "dm.safetensors"))
    return folder, diffusers, native, row_map(native, converter(H))


def test_native_names_come_from_diffusers_converter(files):
    _, diffusers, native, _ = files
    converted = converter(H)(native)
    assert set(converted) == set(diffusers)
    assert all(torch.equal(converted[k], diffusers[k]) for k in diffusers)
    # at Chroma's real width the unpatched converter agrees too (names and shapes, on the meta device)
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        real = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, approximator_layers=1)
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    converted = convert_chroma_transformer_checkpoint_to_diffusers(native_state(real.state_dict(), chroma.FAMILY))
    assert {k: v.shape for k, v in converted.items()} == shapes


def inspect_json(run_cli, path):
    return json.loads(ok(run_cli("inspect", path, "--json")).stdout)


def test_inspect_names_chroma(run_cli, files, tmp_path):
    folder = files[0]
    for name, layout in (("native", "chroma-bfl"), ("comfy", "chroma-bfl"), ("diffusers", "chroma-diffusers")):
        report = inspect_json(run_cli, folder / f"{name}.safetensors")
        assert (report["layout"], report["family"]) == (layout, "Chroma"), name
    approximator = {"distilled_guidance_layer.layers.0.in_layer": (12, 12), "double_blocks.0.img_attn.qkv": (3 * H, H)}
    for dialect in NATIVE_DIALECTS:
        state, _ = lora_state(dialect, approximator, seed=1)
        save_file(state, str(tmp_path / f"{dialect}.safetensors"))
        assert inspect_json(run_cli, tmp_path / f"{dialect}.safetensors")["family"] == "Chroma", dialect
    renamed = {"distilled_guidance_layer.layers.0.linear_1": (12, 12), "transformer_blocks.0.attn.to_q": (H, H)}
    for dialect in DIFFUSERS_DIALECTS:
        state, _ = lora_state(dialect, renamed, seed=1)
        save_file(state, str(tmp_path / f"{dialect}.safetensors"))
        assert inspect_json(run_cli, tmp_path / f"{dialect}.safetensors")["family"] == "Chroma", dialect
    # blocks only: the names are Flux's too, so only the trainer's metadata tells
    state, _ = lora_state("musubi", {"double_blocks.0.img_attn.qkv": (3 * H, H)}, seed=1)
    save_file(state, str(tmp_path / "meta.safetensors"), metadata={"ss_base_model_version": "chroma"})
    report = inspect_json(run_cli, tmp_path / "meta.safetensors")
    assert (report["family"], report["family_from"]) == ("Chroma", "metadata")


#: LoRA targets in native names (fused qkv and linear1, the approximator) and in diffusers names.
NATIVE_MODULES = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.1.txt_attn.qkv": (3 * H, H),
                  "single_blocks.1.linear1": (7 * H, H), "double_blocks.1.img_mlp.2": (H, 4 * H),
                  "distilled_guidance_layer.layers.0.in_layer": (12, 12), "final_layer.linear": (4, H)}
DIFFUSERS_MODULES = {"transformer_blocks.0.attn.to_k": (H, H), "transformer_blocks.1.attn.add_v_proj": (H, H),
                     "single_transformer_blocks.0.proj_mlp": (4 * H, H),
                     "single_transformer_blocks.1.attn.to_q": (H, H),
                     "distilled_guidance_layer.layers.1.linear_2": (12, 12), "proj_out": (4, H)}


@pytest.mark.parametrize("into", ["native", "comfy", "dm", "diffusers"])
@pytest.mark.parametrize("dialect", NATIVE_DIALECTS + DIFFUSERS_DIALECTS)
def test_every_dialect_merges_into_either_naming(run_cli, files, tmp_path, dialect, into):
    folder, diffusers, native, rows = files
    native_names = dialect in NATIVE_DIALECTS
    check_dialect_merge(run_cli, folder, diffusers, native, rows, tmp_path, dialect,
                        NATIVE_MODULES if native_names else DIFFUSERS_MODULES, native_names, into)


def chroma_fused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return peft_fused(tiny_chroma(), state)


def test_kohya_lora_matches_diffusers_own_path(run_cli, files, tmp_path):
    """A kohya (BFL-named) Chroma LoRA read by diffusers' Flux converter, injected with PEFT and fused,
    against our merge into the diffusers file. Where diffusers cannot read it (linear1 split at its
    hard-coded 3072; the approximator, which its converter does not know), our merge is checked
    against float64 in the dialect test above."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    folder, diffusers, _, _ = files
    modules = {k: v for k, v in NATIVE_MODULES.items() if k.startswith("double_blocks") or k == "final_layer.linear"}
    state, _ = lora_state("musubi", modules, seed=3)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder / "diffusers.safetensors", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    theirs = chroma_fused(_convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in state.items()}))
    # diffusers' kohya-Flux converter names final_layer modules without the `transformer.` prefix (and drops
    # their alpha, "TODO: alphas"), so diffusers' loader, which keeps `transformer.` keys, never applies them
    for key in diffusers:
        if key != "proj_out.weight":
            assert rel(merged[key], theirs[key]) < 1e-6, key
    product = state["lora_unet_final_layer_linear.lora_up.weight"].double() @ \
        state["lora_unet_final_layer_linear.lora_down.weight"].double()
    assert rel(merged["proj_out.weight"], diffusers["proj_out.weight"].double() + 1.5 * product) < 1e-6
    assert torch.equal(theirs["proj_out.weight"], diffusers["proj_out.weight"])
    assert "proj_out.lora_A.weight" in _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in state.items()})
    with pytest.raises(AssertionError):  # linear1 split at [3072, 3072, 3072, 12288]
        _convert_kohya_flux_lora_to_diffusers(lora_state("musubi", {"single_blocks.0.linear1": (7 * H, H)}, seed=3)[0])
    with pytest.raises(ValueError, match="Incompatible keys"):
        _convert_kohya_flux_lora_to_diffusers(lora_state(
            "musubi", {"distilled_guidance_layer.layers.0.in_layer": (12, 12)}, seed=3)[0])


def test_convert_round_trips_losslessly(run_cli, files, tmp_path):
    folder, _, _, rows = files
    # every diffusers module's ΔW is the rows of the fused native ΔW that diffusers' converter gives it
    check_convert_round_trip(run_cli, folder, rows, NATIVE_MODULES, tmp_path, seed=4, parts=2 * 3 + 4 + 3)


def test_flux_modulation_on_chroma_needs_skip_missing(run_cli, files, tmp_path):
    """A Flux LoRA that also trained the modulations Chroma pruned: refused in one line, or merged
    without them."""
    folder, _, native, _ = files
    modules = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.img_mod.lin": (6 * H, H),
               "single_blocks.0.modulation.lin": (3 * H, H)}
    state, deltas = lora_state("musubi", modules, seed=5)
    save_file(state, str(tmp_path / "flux.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", folder / "native.safetensors", tmp_path / "flux.safetensors", "-o", out), out,
                   "2 module(s)", "img_mod", "--skip-missing")
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "flux.safetensors", "-o", out, "--skip-missing"))
    merged = load_file(str(out))
    key = "double_blocks.0.img_attn.qkv.weight"
    assert rel(merged[key], native[key].double() + deltas["double_blocks.0.img_attn.qkv"]) < 1e-6


def test_pipeline_folder(run_cli, files, tmp_path):
    """A ChromaPipeline folder: named Chroma, a BFL-named LoRA merges into `transformer/`."""
    _, diffusers, _, rows = files
    folder = pipeline_folder(tmp_path / "pipe", "ChromaPipeline", "ChromaTransformer2DModel", diffusers)
    assert inspect_json(run_cli, folder)["family"] == "Chroma"
    state, deltas = lora_state("comfyui", NATIVE_MODULES, seed=7)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder, tmp_path / "lora.safetensors", "-o", tmp_path / "out"))
    merged = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    expected = expected_merge(diffusers, deltas, rows, native_base=False, native_names=True)
    assert all(rel(merged[k], v) < 1e-6 for k, v in expected.items())
