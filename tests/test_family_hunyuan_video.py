"""HunyuanVideo in both namings: the table against diffusers' own single-file converter, detection of
bases and LoRAs, merges of every trainer dialect into the native file (bare and as ComfyUI saves it)
and the diffusers file, each compared with float64 W + s·B@A computed here (fused `img_attn_qkv`,
`txt_attn_qkv`, the token refiner's `self_attn_qkv` and `linear1` split by rows, and the reverse;
`final_layer`'s row halves swapped), diffusers' own LoRA path where it is right, lossless convert,
and `--skip-missing`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_family_tools import peft_fused, spelled_lora
from helpers import assert_refused, ok, rel
from loratool.layouts.hunyuan_video import FAMILY, SWAPPED_HALVES

H = 8  # the tiny model's hidden size (2 heads of 4)
LDM = "model.diffusion_model."
#: diffusers' converters split `linear1` with q/k/v 3072 rows high (the 13B width), whatever the model.
DIFFUSERS_WIDTH = 3072


def tiny_model(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=8, pooled_projection_dim=6,
        rope_axes_dim=(2, 2, 2)).eval()


def swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict in HunyuanVideo's native names through loratool's table: fused tensors are
    the diffusers parts stacked by rows in the table's order (checked by diffusers' converter below)."""
    modules = {k.rsplit(".", 1)[0] for k in state}
    out, used = {}, set()
    for native, parts in FAMILY.diffusers_groups(modules).items():
        for param in ("weight", "bias"):
            keys = [f"{part}.{param}" for part in parts]
            if all(k in state for k in keys):
                tensor = torch.cat([state[k] for k in keys])
                out[f"{native}.{param}"] = swap(tensor) if native in SWAPPED_HALVES else tensor
                used.update(keys)
    assert not set(state) - used, sorted(set(state) - used)
    return out


def to_diffusers(state: dict[str, torch.Tensor], hidden: int = H) -> dict[str, torch.Tensor]:
    """Native -> diffusers by the rule written out here: qkv in equal thirds, linear1 as q/k/v of `hidden`
    rows and the MLP's rest, final_layer's halves swapped."""
    out = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        parts = FAMILY.native_to_diffusers(module)
        assert parts, key
        if module in SWAPPED_HALVES:
            tensor = swap(tensor)
        if len(parts) == 1:
            sizes = [tensor.shape[0]]
        elif module.endswith("linear1"):
            sizes = [hidden] * 3 + [tensor.shape[0] - 3 * hidden]
        else:
            sizes = [tensor.shape[0] // 3] * 3
        for part, chunk in zip(parts, torch.split(tensor, sizes)):
            out[f"{part}.{param}"] = chunk
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hunyuan-video")
    diffusers = {k: v.detach().clone() for k, v in tiny_model().state_dict().items()}
    native = to_native(diffusers)
    save_file(native, str(folder / "native.safetensors"))
    save_file({LDM + k: v for k, v in native.items()}, str(folder / "comfy.safetensors"))
    save_file(diffusers, str(folder / "diffusers.safetensors"))
    return folder, native, diffusers


def test_native_names_are_diffusers_converters(files):
    """The table writes a native file that diffusers' converter maps back tensor for tensor. Its
    `linear1` split hard-codes 3072-row q/k/v, so here the single block's q/k/v are 3072 rows high (the
    input width stays tiny); every other tensor is the tiny model's own."""
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    _, native, diffusers = files
    generator = torch.Generator().manual_seed(5)
    wide = dict(diffusers)
    for part in ("attn.to_q", "attn.to_k", "attn.to_v"):
        wide[f"single_transformer_blocks.0.{part}.weight"] = torch.randn(DIFFUSERS_WIDTH, H, generator=generator)
        wide[f"single_transformer_blocks.0.{part}.bias"] = torch.randn(DIFFUSERS_WIDTH, generator=generator)
    wide_native = to_native(wide)
    assert "single_blocks.0.linear1.weight" in wide_native and "double_blocks.0.img_attn_qkv.weight" in wide_native
    assert "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight" in wide_native
    converted = convert_hunyuan_video_transformer_to_diffusers(dict(wide_native))
    assert set(converted) == set(wide)
    assert all(torch.equal(converted[k], wide[k]) for k in wide)
    # the test's own inverse agrees with diffusers' (and is exact at the tiny width too)
    back = to_diffusers(wide_native, DIFFUSERS_WIDTH)
    assert set(back) == set(wide) and all(torch.equal(back[k], wide[k]) for k in wide)
    tiny = to_diffusers(native)
    assert set(tiny) == set(diffusers) and all(torch.equal(tiny[k], diffusers[k]) for k in diffusers)


# --- LoRAs in every dialect ------------------------------------------------------------------------------

#: Native modules (fused and plain, the swapped final layer, the token refiner).
NATIVE_MODULES = ("double_blocks.0.img_attn_qkv", "double_blocks.0.txt_attn_qkv", "double_blocks.0.img_mlp.fc1",
                  "double_blocks.0.txt_mod.linear", "double_blocks.0.img_attn_proj", "single_blocks.0.linear1",
                  "single_blocks.0.linear2", "final_layer.adaLN_modulation.1",
                  "txt_in.individual_token_refiner.blocks.0.self_attn_qkv", "txt_in.input_embedder")
#: Diffusers modules (separate q/k/v into fused native rows, the MLP part of linear1, norm_out).
DIFFUSERS_MODULES = ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj",
                     "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.0.attn.to_q",
                     "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
                     "norm_out.linear", "context_embedder.token_refiner.refiner_blocks.0.attn.to_v",
                     "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear")
#: dialect -> (naming it uses, module-name prefix, flattened, A role, B role)
DIALECTS = {
    "musubi": ("native", "lora_unet_", True, "lora_down.weight", "lora_up.weight"),
    "comfyui": ("native", "diffusion_model.", False, "lora_A.weight", "lora_B.weight"),
    "mochi": ("native", "diffusion_model.", False, "lora_A", "lora_B"),
    "diffusers": ("diffusers", "transformer.", False, "lora_A.weight", "lora_B.weight"),
    "onetrainer": ("diffusers", "lora_transformer_", True, "lora_down.weight", "lora_up.weight"),
    "lycoris": ("diffusers", "lycoris_", True, None, None),
}


def lora(dialect: str, shapes: dict[str, torch.Tensor], modules, alpha: float | None = 3.0, seed: int = 1,
         rank: int = 2):
    """(file tensors, {module: float64 ΔW}) for `modules` in the dialect's naming (`spelled_lora`)."""
    return spelled_lora(*DIALECTS[dialect][1:], shapes, modules, alpha, seed, rank)


def expected(files, dialect: str, deltas: dict[str, torch.Tensor]):
    """(expected native file, expected diffusers file) in float64: the deltas, in the LoRA's naming,
    carried into diffusers names (split by rows, halves swapped) and added there."""
    _, _, diffusers = files
    named = {f"{m}.weight": d for m, d in deltas.items()}
    if DIALECTS[dialect][0] == "native":
        named = to_diffusers(named)
    merged = {k: v.double() + named[k] if k in named else v.double() for k, v in diffusers.items()}
    return to_native(merged), merged


def assert_merged(path, want: dict[str, torch.Tensor], base: dict[str, torch.Tensor], prefix: str = ""):
    merged = load_file(str(path))
    assert set(merged) == {prefix + k for k in want}
    for key, tensor in want.items():
        if torch.equal(tensor, base[key].double()):
            assert torch.equal(merged[prefix + key], base[key]), key
        else:
            assert rel(merged[prefix + key], tensor) < 1e-6, key


def shapes_for(dialect, files):
    _, native, diffusers = files
    return (native, NATIVE_MODULES) if DIALECTS[dialect][0] == "native" else (diffusers, DIFFUSERS_MODULES)


@pytest.mark.parametrize("dialect,alpha", [("musubi", 3.0), ("comfyui", 3.0), ("comfyui", None), ("mochi", 4.0),
                                           ("diffusers", None), ("onetrainer", 3.0), ("lycoris", 3.0)])
def test_every_dialect_merges_into_both_namings(run_cli, files, tmp_path, dialect, alpha):
    folder, native, diffusers = files
    source, modules = shapes_for(dialect, files)
    state, deltas = lora(dialect, source, modules, alpha=alpha)
    save_file(state, str(tmp_path / "lora.safetensors"))
    want_native, want_diffusers = expected(files, dialect, deltas)
    report = json.loads(ok(run_cli("inspect", tmp_path / "lora.safetensors", "--json")).stdout)
    assert report["family"] == "HunyuanVideo", report
    for base, want, ref, prefix in (("native", want_native, native, ""), ("comfy", want_native, native, LDM),
                                    ("diffusers", want_diffusers, diffusers, "")):
        out = tmp_path / f"{base}.safetensors"
        ok(run_cli("merge", folder / f"{base}.safetensors", tmp_path / "lora.safetensors", "-o", out))
        assert_merged(out, want, ref, prefix)


def test_bases_are_detected(run_cli, files):
    folder, _, _ = files
    for name, layout in (("native", "hunyuan-video-native"), ("comfy", "hunyuan-video-native"),
                         ("diffusers", "hunyuan-video-diffusers")):
        report = json.loads(ok(run_cli("inspect", folder / f"{name}.safetensors", "--json")).stdout)
        assert (report["layout"], report["family"]) == (layout, "HunyuanVideo"), name
    assert FAMILY.variant({"img_in.proj.weight": (3072, 16, 1, 2, 2)}) == "13B T2V"
    assert FAMILY.variant({"x_embedder.proj.weight": (3072, 33, 1, 2, 2)}) == "13B I2V"


def test_flux_and_hunyuan_video_do_not_claim_each_other(run_cli, tmp_path):
    """Both have double_blocks/single_blocks (and single_transformer_blocks): only the token refiner
    makes a HunyuanVideo file."""
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8), "single_blocks.0.linear1.weight": torch.zeros(56, 8),
            "txt_in.weight": torch.zeros(8, 8)}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    save_file({"single_transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8),
               "transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8)}, str(tmp_path / "flux-d.safetensors"))
    for name in ("flux", "flux-d"):
        assert json.loads(ok(run_cli("inspect", tmp_path / f"{name}.safetensors", "--json")).stdout)["family"] == "Flux"
    # HunyuanVideo 1.5 has a token refiner but no single-stream blocks: not this family
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8),
               "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight": torch.zeros(8, 8)},
              str(tmp_path / "hv15.safetensors"))
    report = json.loads(ok(run_cli("inspect", tmp_path / "hv15.safetensors", "--json")).stdout)
    assert report["family"] != "HunyuanVideo"


def test_diffusers_lora_path_agrees_where_it_is_right(run_cli, files, tmp_path):
    """diffusers' own HunyuanVideo LoRA path (convert, load with PEFT, fuse) on a diffusion-pipe LoRA
    without alphas gives the same merged weights for the double-block modules. Where it is wrong, the
    float64 rule holds: it chunks the token refiner's A into thirds, swaps A's rank rows with
    final_layer's B halves, splits linear1 at a hard-coded 3072 rows, and converts nothing when no key
    has img_attn_qkv."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers
    from diffusers import HunyuanVideoPipeline

    folder, native, diffusers = files
    right = ("double_blocks.0.img_attn_qkv", "double_blocks.0.txt_attn_qkv", "double_blocks.0.img_mlp.fc1",
             "double_blocks.0.txt_mod.linear", "double_blocks.0.img_attn_proj")
    state, deltas = lora("comfyui", native, right, alpha=None, seed=7)
    save_file(state, str(tmp_path / "pipe.safetensors"))
    ok(run_cli("merge", folder / "diffusers.safetensors", tmp_path / "pipe.safetensors", "-o", tmp_path / "m.safetensors"))
    ours = load_file(str(tmp_path / "m.safetensors"))
    converted = _convert_hunyuan_video_lora_to_diffusers({k: v.clone() for k, v in state.items()})
    theirs = peft_fused(tiny_model(), converted)
    for key, tensor in ours.items():
        assert rel(tensor, theirs[key].double()) < 1e-5, key
    assert_merged(tmp_path / "m.safetensors", expected(files, "comfyui", deltas)[1], diffusers)

    # where diffusers goes wrong: the refiner's qkv (A chunked) and final_layer (A's rank rows swapped)
    bad, bad_deltas = lora("comfyui", native, ("double_blocks.0.img_attn_qkv",
                                               "txt_in.individual_token_refiner.blocks.0.self_attn_qkv",
                                               "final_layer.adaLN_modulation.1"), alpha=None, rank=3, seed=8)
    split = _convert_hunyuan_video_lora_to_diffusers({k: v.clone() for k, v in bad.items()})
    refiner = "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q"
    assert split[f"{refiner}.lora_A.weight"].shape[0] == 1  # a third of rank 3: B (rank 3) no longer fits
    norm = split["transformer.norm_out.linear.lora_B.weight"].double() @ split["transformer.norm_out.linear.lora_A.weight"].double()
    assert rel(norm, swap(bad_deltas["final_layer.adaLN_modulation.1"])) > 0.1
    save_file(bad, str(tmp_path / "bad.safetensors"))
    ok(run_cli("merge", folder / "diffusers.safetensors", tmp_path / "bad.safetensors", "-o", tmp_path / "b.safetensors"))
    assert_merged(tmp_path / "b.safetensors", expected(files, "comfyui", bad_deltas)[1], diffusers)
    # linear1 split at 3072 rows, and an .alpha chunked like a B: both raise at the tiny width
    for modules, alpha in ((("double_blocks.0.img_attn_qkv", "single_blocks.0.linear1"), None),
                           (("double_blocks.0.img_attn_qkv",), 3.0)):
        failing, _ = lora("comfyui", native, modules, alpha=alpha)
        with pytest.raises(RuntimeError):
            _convert_hunyuan_video_lora_to_diffusers(dict(failing))
    # no img_attn_qkv key: diffusers leaves the native names as they are (nothing would load)
    only_single, _ = lora("comfyui", native, ("single_blocks.0.linear2",), alpha=None)
    loaded = HunyuanVideoPipeline.lora_state_dict({k: v.clone() for k, v in only_single.items()})
    assert all(k.startswith("diffusion_model.single_blocks.") for k in loaded)


def convert_round_trip(run_cli, files, tmp_path, modules):
    """musubi (native, fused) -> diffusers names against the native file -> kohya against the diffusers
    file: every merge of the three files is the same float64 result."""
    folder, native, diffusers = files
    state, deltas = lora("musubi", native, modules, alpha=3.0, seed=11)
    save_file(state, str(tmp_path / "musubi.safetensors"))
    ok(run_cli("convert", tmp_path / "musubi.safetensors", "--to", "diffusers", "--base", folder / "native.safetensors",
               "-o", tmp_path / "d.safetensors"))
    assert all(k.startswith("transformer.") for k in load_file(str(tmp_path / "d.safetensors")))
    ok(run_cli("convert", tmp_path / "d.safetensors", "--to", "kohya", "--base", folder / "diffusers.safetensors",
               "-o", tmp_path / "k.safetensors"))
    want_native, want_diffusers = expected(files, "musubi", deltas)
    for lora_file in ("musubi", "d", "k"):
        for base, want, ref in (("native", want_native, native), ("diffusers", want_diffusers, diffusers)):
            out = tmp_path / f"{lora_file}-{base}.safetensors"
            ok(run_cli("merge", folder / f"{base}.safetensors", tmp_path / f"{lora_file}.safetensors", "-o", out))
            assert_merged(out, want, ref)


def test_convert_round_trips(run_cli, files, tmp_path):
    convert_round_trip(run_cli, files, tmp_path, [m for m in NATIVE_MODULES if m not in SWAPPED_HALVES])


def test_convert_swaps_final_layer_halves_against_a_native_base(run_cli, files, tmp_path):
    convert_round_trip(run_cli, files, tmp_path, ["final_layer.adaLN_modulation.1"])


def test_missing_modules_are_refused_then_skipped(run_cli, files, tmp_path):
    folder, native, _ = files
    shapes = dict(native)
    shapes["double_blocks.7.img_attn_qkv.weight"] = native["double_blocks.0.img_attn_qkv.weight"]
    state, deltas = lora("musubi", shapes, ("double_blocks.0.img_attn_qkv", "double_blocks.7.img_attn_qkv"))
    save_file(state, str(tmp_path / "extra.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", folder / "native.safetensors", tmp_path / "extra.safetensors", "-o", out), out,
                   "1 module(s)", "double_blocks_7_img_attn_qkv", "--skip-missing")
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "extra.safetensors", "-o", out, "--skip-missing"))
    want, _ = expected(files, "musubi", {"double_blocks.0.img_attn_qkv": deltas["double_blocks.0.img_attn_qkv"]})
    assert_merged(out, want, native)


def test_metadata_names_the_family():
    from loratool.layouts.families import adapter_family

    assert adapter_family([], {}, {"ss_base_model_version": "hunyuan_video"}) == ("HunyuanVideo", "metadata")
