"""HiDream (`HiDreamImageTransformer2DModel`): one naming for the single file and diffusers, checked
against diffusers' own single-file converter; detection of bases and LoRAs; merges of every trainer
dialect (SimpleTuner's LyCORIS LoKr/LoHa among them) into the single file (bare, as ComfyUI saves it,
under `diffusion_model.`) and a diffusers `transformer/` folder, each compared with float64 W + s·B@A
computed here; diffusers' own LoRA path; lossless convert; `--skip-missing`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_family_tools import peft_fused, spelled_lora
from helpers import assert_refused, load_folder, ok, rel
from loratool.layouts.hidream import FAMILY

LDM = "model.diffusion_model."


def tiny_model(seed: int = 0):
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=4,
        num_attention_heads=2, caption_channels=[6, 5], text_emb_dim=6, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(2, 2), max_resolution=(8, 8), llama_layers=[0, 1]).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hidream")
    model = tiny_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "native.safetensors"))
    save_file({LDM + k: v for k, v in state.items()}, str(folder / "comfy.safetensors"))
    save_file({"diffusion_model." + k: v for k, v in state.items()}, str(folder / "dm.safetensors"))
    model.save_pretrained(folder / "transformer")
    return folder, state


def test_native_names_are_diffusers_converters(files):
    """diffusers' converter maps the single file (as ComfyUI saves it) onto the diffusers model's names,
    tensor for tensor: the identity after the prefix, so the table renames nothing."""
    from diffusers.loaders.single_file_utils import convert_hidream_transformer_to_diffusers

    folder, state = files
    comfy = load_file(str(folder / "comfy.safetensors"))
    converted = convert_hidream_transformer_to_diffusers(dict(comfy))
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)
    assert FAMILY.blocks == () and not FAMILY.top_level
    saved = load_folder(folder / "transformer")
    assert set(saved) == set(state)


def test_bases_are_detected(run_cli, files):
    folder, _ = files
    # (a base under `diffusion_model.` is read as one by merge, below; inspect takes such a file for an
    # adapter, as it takes ComfyUI's LoRA saver's names)
    for name in ("native.safetensors", "comfy.safetensors", "transformer"):
        report = json.loads(ok(run_cli("inspect", folder / name, "--json")).stdout)
        assert (report["layout"], report["family"]) == ("hidream", "HiDream"), name
    assert FAMILY.variant({"x_embedder.proj.weight": (2560, 64)}) == "17B"


#: Modules across the model: both streams' attention, routed and shared experts, the text FFN, the
#: modulation, the caption projection, the final layer.
MODULES = ("double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_k_t",
           "double_stream_blocks.0.block.attn1.to_out", "double_stream_blocks.0.block.ff_i.experts.1.w1",
           "double_stream_blocks.0.block.ff_i.shared_experts.w2", "double_stream_blocks.0.block.ff_t.w3",
           "double_stream_blocks.0.block.adaLN_modulation.1", "single_stream_blocks.0.block.attn1.to_v",
           "single_stream_blocks.0.block.ff_i.experts.0.w2", "caption_projection.2.linear", "final_layer.linear")
#: dialect -> (module-name prefix, flattened, A role, B role)
DIALECTS = {
    "musubi": ("lora_unet_", True, "lora_down.weight", "lora_up.weight"),
    "comfyui": ("diffusion_model.", False, "lora_A.weight", "lora_B.weight"),
    "mochi": ("diffusion_model.", False, "lora_A", "lora_B"),
    "diffusers": ("transformer.", False, "lora_A.weight", "lora_B.weight"),
    "onetrainer": ("lora_transformer_", True, "lora_down.weight", "lora_up.weight"),
    "lycoris": ("lycoris_", True, None, None),
}


def lora(dialect: str, state: dict[str, torch.Tensor], modules=MODULES, alpha: float | None = 3.0, seed: int = 1,
         rank: int = 2):
    """(file tensors, {module: float64 ΔW}) for `modules` in `dialect` (`spelled_lora`)."""
    return spelled_lora(*DIALECTS[dialect], state, modules, alpha, seed, rank)


def assert_merged(merged: dict[str, torch.Tensor], state: dict[str, torch.Tensor], deltas, prefix: str = ""):
    assert set(merged) == {prefix + k for k in state}
    for key, tensor in state.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in deltas:
            assert rel(merged[prefix + key], tensor.double() + deltas[module]) < 1e-6, key
        else:
            assert torch.equal(merged[prefix + key], tensor), key


@pytest.mark.parametrize("dialect,alpha", [("musubi", 3.0), ("comfyui", 3.0), ("comfyui", None), ("mochi", 4.0),
                                           ("diffusers", None), ("onetrainer", 3.0), ("lycoris", 3.0)])
def test_every_dialect_merges_into_every_base(run_cli, files, tmp_path, dialect, alpha):
    folder, state = files
    tensors, deltas = lora(dialect, state, alpha=alpha)
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    report = json.loads(ok(run_cli("inspect", tmp_path / "lora.safetensors", "--json")).stdout)
    assert report["family"] == "HiDream", report
    for base, prefix in (("native.safetensors", ""), ("comfy.safetensors", LDM), ("dm.safetensors", "diffusion_model.")):
        out = tmp_path / f"m-{base}"
        ok(run_cli("merge", folder / base, tmp_path / "lora.safetensors", "-o", out))
        assert_merged(load_file(str(out)), state, deltas, prefix)
    ok(run_cli("merge", folder / "transformer", tmp_path / "lora.safetensors", "-o", tmp_path / "m-folder"))
    assert_merged(load_folder(tmp_path / "m-folder"), state, deltas)


def test_diffusers_lora_path_agrees(run_cli, files, tmp_path):
    """diffusers' own path for a ComfyUI/diffusion-pipe HiDream LoRA (convert, load with PEFT, fuse) gives
    the merged weights loratool writes."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_hidream_lora_to_diffusers

    folder, state = files
    tensors, deltas = lora("comfyui", state, alpha=None, seed=4)
    save_file(tensors, str(tmp_path / "pipe.safetensors"))
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "pipe.safetensors", "-o", tmp_path / "m.safetensors"))
    ours = load_file(str(tmp_path / "m.safetensors"))
    converted = _convert_non_diffusers_hidream_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})
    theirs = peft_fused(tiny_model(), converted)
    for key, tensor in ours.items():
        assert rel(tensor, theirs[key].double()) < 1e-5, key
    assert_merged(ours, state, deltas)


def test_convert_round_trips(run_cli, files, tmp_path):
    """SimpleTuner LyCORIS (LoKr, LoHa, LoRA) -> kohya against the single file -> and a musubi LoRA ->
    diffusers names against the single file -> kohya against the diffusers folder: the same merges."""
    folder, state = files
    tensors, deltas = lora("musubi", state, seed=9)
    save_file(tensors, str(tmp_path / "musubi.safetensors"))
    ok(run_cli("convert", tmp_path / "musubi.safetensors", "--to", "diffusers", "--base", folder / "comfy.safetensors",
               "-o", tmp_path / "d.safetensors"))
    assert all(k.startswith("transformer.") for k in load_file(str(tmp_path / "d.safetensors")))
    ok(run_cli("convert", tmp_path / "d.safetensors", "--to", "kohya", "--base", folder / "transformer",
               "-o", tmp_path / "k.safetensors"))
    assert all(k.startswith("lora_unet_") for k in load_file(str(tmp_path / "k.safetensors")))
    lyco, lyco_deltas = lora("lycoris", state, seed=10)
    save_file(lyco, str(tmp_path / "lyco.safetensors"))
    ok(run_cli("convert", tmp_path / "lyco.safetensors", "--to", "kohya", "--base", folder / "native.safetensors",
               "-o", tmp_path / "lk.safetensors"))
    for name, want in (("d", deltas), ("k", deltas), ("lk", lyco_deltas)):
        ok(run_cli("merge", folder / "native.safetensors", tmp_path / f"{name}.safetensors", "-o", tmp_path / f"{name}-m.safetensors"))
        assert_merged(load_file(str(tmp_path / f"{name}-m.safetensors")), state, want)


def test_missing_modules_are_refused_then_skipped(run_cli, files, tmp_path):
    folder, state = files
    shapes = dict(state)
    shapes["double_stream_blocks.9.block.attn1.to_q.weight"] = state["double_stream_blocks.0.block.attn1.to_q.weight"]
    tensors, deltas = lora("comfyui", shapes, ("double_stream_blocks.0.block.attn1.to_q",
                                               "double_stream_blocks.9.block.attn1.to_q"))
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", folder / "native.safetensors", tmp_path / "extra.safetensors", "-o", out), out,
                   "1 module(s)", "double_stream_blocks.9.block.attn1.to_q", "--skip-missing")
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "extra.safetensors", "-o", out, "--skip-missing"))
    del deltas["double_stream_blocks.9.block.attn1.to_q"]
    assert_merged(load_file(str(out)), state, deltas)


def test_metadata_names_the_family():
    from loratool.layouts.families import adapter_family

    assert adapter_family([], {}, {"modelspec.architecture": "hidream-i1-dev"}) == ("HiDream", "metadata")
