"""Z-Image and Lumina2 (`layouts/z_image.py`, one native layout, two diffusers namings): the native names
against diffusers' own single-file converters, detection (Z-Image vs Lumina2) of native files bare and
as ComfyUI saves them and of diffusers files, LoRAs in every trainer dialect (musubi-tuner's Z-Image
LoRAs name diffusers' separate q/k/v: they merge into the native fused `qkv` rows) compared with float64
W + s·B@A and with diffusers' own LoRA path, lossless convert round trips, and --skip-missing."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_family_tools import (check_convert_round_trip, check_dialect_merge, DIFFUSERS_DIALECTS, expected_merge,
                              lora_state, NATIVE_DIALECTS, native_state, peft_fused, pipeline_folder, row_map)
from helpers import assert_refused, ok, rel
from loratool.layouts import z_image

LDM = "model.diffusion_model."


def z_image_model(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                    cap_feat_dim=12, axes_dims=[2, 2, 4], axes_lens=[8, 8, 8]).eval()


def lumina2_model(seed: int = 0):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(sample_size=8, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=2,
                                     num_attention_heads=4, num_kv_heads=2, multiple_of=8, axes_dim_rope=(2, 2, 4),
                                     axes_lens=(8, 8, 8), cap_feat_dim=12).eval()


def z_image_converter():
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return lambda state: convert_z_image_transformer_checkpoint_to_diffusers(dict(state))


def lumina2_converter():
    """diffusers' Lumina2 converter with its hard-coded q/k/v split (2304/768/768) set to the tiny model's
    (16/8/8); every other line is diffusers' own."""
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_lumina2_to_diffusers)
    assert "q_dim = 2304" in source and "k_dim = v_dim = 768" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("q_dim = 2304", "q_dim = 16").replace("k_dim = v_dim = 768", "k_dim = v_dim = 8"), namespace)
    return lambda state: namespace["convert_lumina2_to_diffusers"](dict(state))


#: family -> (table, tiny model, converter, LoRA targets in native names, in diffusers names).
CASES = {
    "Z-Image": (z_image.FAMILY, z_image_model, z_image_converter,
                {"layers.0.attention.qkv": (48, 16), "noise_refiner.0.attention.out": (16, 16),
                 "context_refiner.0.feed_forward.w1": (42, 16), "layers.1.adaLN_modulation.0": (64, 16),
                 "final_layer.linear": (16, 16), "x_embedder": (16, 16)},
                {"layers.0.attention.to_k": (16, 16), "layers.1.attention.to_out.0": (16, 16),
                 "noise_refiner.0.attention.to_v": (16, 16), "context_refiner.0.attention.to_q": (16, 16),
                 "layers.0.feed_forward.w2": (16, 42), "all_final_layer.2-1.adaLN_modulation.1": (16, 16),
                 "all_x_embedder.2-1": (16, 16)}),
    "Lumina2": (z_image.LUMINA2, lumina2_model, lumina2_converter,
                {"layers.0.attention.qkv": (32, 16), "noise_refiner.0.adaLN_modulation.1": (64, 16),
                 "context_refiner.1.feed_forward.w3": (64, 16), "layers.1.attention.out": (16, 16),
                 "final_layer.adaLN_modulation.1": (16, 16), "t_embedder.mlp.0": (16, 256)},
                {"layers.0.attn.to_k": (8, 16), "layers.1.attn.to_q": (16, 16), "noise_refiner.1.norm1.linear": (64, 16),
                 "context_refiner.0.feed_forward.linear_2": (16, 64), "norm_out.linear_1": (16, 16),
                 "time_caption_embed.timestep_embedder.linear_1": (16, 256)}),
}
LAYOUTS = {"Z-Image": ("z-image-native", "z-image-diffusers"), "Lumina2": ("lumina2-native", "lumina2-diffusers")}


@pytest.fixture(scope="module", params=sorted(CASES))
def files(request, tmp_path_factory):
    family, model, convert, _, _ = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    diffusers = {k: v.detach().clone() for k, v in model().state_dict().items()}
    native = native_state(diffusers, family)
    save_file(diffusers, str(folder / "diffusers.safetensors"))
    save_file(native, str(folder / "native.safetensors"))
    save_file({LDM + k: v for k, v in native.items()}, str(folder / "comfy.safetensors"))
    save_file({"diffusion_model." + k: v for k, v in native.items()}, str(folder / "dm.safetensors"))
    return request.param, folder, diffusers, native, row_map(native, convert())


def test_native_names_come_from_diffusers_converter(files):
    name, _, diffusers, native, _ = files
    converted = CASES[name][2]()(native)
    assert set(converted) == set(diffusers)
    assert all(torch.equal(converted[k], diffusers[k]) for k in diffusers)
    assert any(k.endswith("attention.qkv.weight") for k in native)  # the fused native tensor is there


def inspect_json(run_cli, path):
    return json.loads(ok(run_cli("inspect", path, "--json")).stdout)


def test_inspect_tells_z_image_from_lumina2(run_cli, files, tmp_path):
    name, folder, _, _, _ = files
    native_layout, diffusers_layout = LAYOUTS[name]
    for file, layout in (("native", native_layout), ("comfy", native_layout), ("diffusers", diffusers_layout)):
        report = inspect_json(run_cli, folder / f"{file}.safetensors")
        assert (report["layout"], report["family"]) == (layout, name), file
    _, _, _, native_modules, diffusers_modules = CASES[name]
    for dialect in NATIVE_DIALECTS + DIFFUSERS_DIALECTS:
        modules = native_modules if dialect in NATIVE_DIALECTS else diffusers_modules
        state, _ = lora_state(dialect, modules, seed=1)
        save_file(state, str(tmp_path / f"{dialect}.safetensors"))
        assert inspect_json(run_cli, tmp_path / f"{dialect}.safetensors")["family"] == name, dialect


#: (dialect, naming of its modules): every dialect in the names it is written in, and the two ways
#: Z-Image LoRAs name diffusers' modules in a native dialect: musubi-tuner (`lora_unet_layers_0_attention_to_q`)
#: and ai-toolkit (`diffusion_model.layers.0.attention.to_q.lora_A.weight`).
MERGES = [(d, "native") for d in NATIVE_DIALECTS] + [(d, "diffusers") for d in DIFFUSERS_DIALECTS] + [
    ("musubi", "diffusers"), ("comfyui", "diffusers")]


@pytest.mark.parametrize("into", ["native", "comfy", "dm", "diffusers"])
@pytest.mark.parametrize("dialect,naming", MERGES)
def test_every_dialect_merges_into_either_naming(run_cli, files, tmp_path, dialect, naming, into):
    name, folder, diffusers, native, rows = files
    _, _, _, native_modules, diffusers_modules = CASES[name]
    check_dialect_merge(run_cli, folder, diffusers, native, rows, tmp_path, dialect,
                        native_modules if naming == "native" else diffusers_modules, naming == "native", into)


def merged_into_diffusers(run_cli, folder, tmp_path, state) -> dict[str, torch.Tensor]:
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder / "diffusers.safetensors", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    return load_file(str(tmp_path / "m.safetensors"))


def test_z_image_matches_diffusers_own_path(run_cli, tmp_path_factory, tmp_path):
    """A musubi-tuner Z-Image LoRA (the "lora key not loaded" one: diffusers' names, flattened) through
    diffusers' Z-Image converter, PEFT and fuse, against our merge; with a kohya LoRA on the native
    fused `qkv` of another layer, which both split by rows."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    folder = tmp_path_factory.mktemp("z-peft")
    save_file({k: v.detach().clone() for k, v in z_image_model().state_dict().items()},
              str(folder / "diffusers.safetensors"))
    modules = {"layers.0.attention.to_q": (16, 16), "layers.0.attention.to_k": (16, 16),
               "layers.1.attention.to_out.0": (16, 16), "noise_refiner.0.feed_forward.w1": (42, 16),
               "context_refiner.0.attention.to_v": (16, 16), "layers.1.adaLN_modulation.0": (64, 16),
               "layers.1.attention.qkv": (48, 16)}
    state, _ = lora_state("musubi", modules, seed=3)
    ours = merged_into_diffusers(run_cli, folder, tmp_path, state)
    theirs = peft_fused(z_image_model(), _convert_non_diffusers_z_image_lora_to_diffusers(dict(state)))
    assert set(ours) == set(theirs)
    for key in ours:
        assert rel(ours[key], theirs[key]) < 1e-6, key
    assert not torch.equal(ours["layers.1.attention.to_v.weight"], z_image_model().state_dict()["layers.1.attention.to_v.weight"])


def test_lumina2_matches_diffusers_own_path(run_cli, tmp_path_factory, tmp_path):
    """A ComfyUI-style Lumina2 LoRA on every module of one block through diffusers' Lumina2 converter
    (its hard-coded 2304/768/768 qkv split set to the tiny model's), PEFT and fuse, against our merge.
    diffusers' converter also needs every module of each block it sees, and refuses `.alpha` (it stays
    behind in the state dict): loratool applies it (float64-checked above)."""
    from diffusers.loaders import lora_conversion_utils

    source = inspect.getsource(lora_conversion_utils._convert_non_diffusers_lumina2_lora_to_diffusers)
    namespace = dict(vars(lora_conversion_utils))
    exec(source.replace("[2304, 768, 768]", "[16, 8, 8]"), namespace)
    convert = namespace["_convert_non_diffusers_lumina2_lora_to_diffusers"]
    folder = tmp_path_factory.mktemp("lumina-peft")
    save_file({k: v.detach().clone() for k, v in lumina2_model().state_dict().items()},
              str(folder / "diffusers.safetensors"))
    modules = {"layers.0.attention.qkv": (32, 16), "layers.0.attention.out": (16, 16),
               "layers.0.feed_forward.w1": (64, 16), "layers.0.feed_forward.w2": (16, 64),
               "layers.0.feed_forward.w3": (64, 16), "layers.0.adaLN_modulation.1": (64, 16)}
    state, _ = lora_state("comfyui-noalpha", modules, seed=4)
    ours = merged_into_diffusers(run_cli, folder, tmp_path, state)
    theirs = peft_fused(lumina2_model(), convert(dict(state)))
    for key in ours:
        assert rel(ours[key], theirs[key]) < 1e-6, key
    with pytest.raises(ValueError, match="should be empty"):
        convert(lora_state("comfyui", modules, seed=4)[0])


def test_convert_round_trips_losslessly(run_cli, files, tmp_path):
    name, folder, _, _, rows = files
    native_modules = CASES[name][3]
    check_convert_round_trip(run_cli, folder, rows, native_modules, tmp_path, seed=5,
                             parts=len(native_modules) + 2)  # qkv -> to_q, to_k, to_v


def test_a_lumina2_lora_on_z_image_needs_skip_missing(run_cli, tmp_path_factory, tmp_path):
    """Lumina2's block modulation (`adaLN_modulation.1`) is not in Z-Image (`.0`): refused in one line,
    or merged without it."""
    folder = tmp_path_factory.mktemp("z-skip")
    native = native_state({k: v.detach().clone() for k, v in z_image_model().state_dict().items()}, z_image.FAMILY)
    save_file(native, str(folder / "native.safetensors"))
    state, deltas = lora_state("comfyui", {"layers.0.attention.qkv": (48, 16), "layers.0.adaLN_modulation.1": (64, 16),
                                           "layers.1.adaLN_modulation.1": (64, 16)}, seed=6)
    save_file(state, str(tmp_path / "lumina.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", folder / "native.safetensors", tmp_path / "lumina.safetensors", "-o", out), out,
                   "2 module(s)", "adaLN_modulation.1", "--skip-missing")
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "lumina.safetensors", "-o", out, "--skip-missing"))
    key = "layers.0.attention.qkv.weight"
    assert rel(load_file(str(out))[key], native[key].double() + deltas["layers.0.attention.qkv"]) < 1e-6


def test_pipeline_folder(run_cli, files, tmp_path):
    """A ZImagePipeline / Lumina2Pipeline folder: named by its class, a native-named LoRA merges into
    `transformer/`."""
    name, _, diffusers, _, rows = files
    pipeline, model = {"Z-Image": ("ZImagePipeline", "ZImageTransformer2DModel"),
                       "Lumina2": ("Lumina2Pipeline", "Lumina2Transformer2DModel")}[name]
    folder = pipeline_folder(tmp_path / "pipe", pipeline, model, diffusers)
    assert inspect_json(run_cli, folder)["family"] == name
    state, deltas = lora_state("musubi", CASES[name][3], seed=7)
    save_file(state, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder, tmp_path / "lora.safetensors", "-o", tmp_path / "out"))
    merged = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    expected = expected_merge(diffusers, deltas, rows, native_base=False, native_names=True)
    assert all(rel(merged[k], v) < 1e-6 for k, v in expected.items())
