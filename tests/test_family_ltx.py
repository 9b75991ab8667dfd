"""LTX-Video and LTX-2 against diffusers: tiny transformers built from configs here, native single files
written through loratool's table and read back by diffusers' own single-file converters, LoRAs in every
trainer dialect merged into native and diffusers files and compared with float64 W + s·B@A, diffusers'
own LoRA paths (which ignore `.alpha`, and for LTX-Video drop the renamed top-level modules), lossless
convert round trips, and `--skip-missing`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dit_family_tools import flat, named_lora
from helpers import assert_refused, load_folder, ok, rel

LDM = "model.diffusion_model."
def ltxv_model():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=2, caption_channels=12).eval()


def ltx2_model():
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                                       audio_num_attention_heads=2, audio_attention_head_dim=4,
                                       audio_cross_attention_dim=8, num_layers=2, caption_channels=12).eval()


def randomized(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def diffusers_to_native(family) -> dict[str, str]:
    """diffusers path -> native path for every single-part entry of the family's table (modules and the
    block parameters it lists), for 2 blocks."""
    out = {v: k for k, v in family.top_level.items()}
    for block in family.blocks:
        for n in range(2):
            for leaf, parts in block.leaves.items():
                if len(parts) == 1:
                    out[f"{block.diffusers}.{n}.{parts[0]}"] = f"{block.native}.{n}.{leaf}"
    return out


def to_native(state: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the family's native names, through loratool's table."""
    names = diffusers_to_native(family)
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if key in names:  # a parameter the table lists itself (LTX-2's a2v scale-shift tables)
            out[names[key]] = tensor.clone()
        elif not module:  # a top-level parameter (scale_shift_table)
            out[key] = tensor.clone()
        else:
            out[f"{names.get(module, module)}.{param}"] = tensor.clone()
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (path, diffusers state dict, merged file -> diffusers names)."""
    from diffusers.loaders.single_file_utils import (convert_ltx2_transformer_to_diffusers,
                                                     convert_ltx_transformer_checkpoint_to_diffusers)

    from loratool.layouts import ltx

    folder = tmp_path_factory.mktemp("ltx")
    found = {}
    for kind, model, family, convert in (("ltxv", ltxv_model(), ltx.FAMILY, convert_ltx_transformer_checkpoint_to_diffusers),
                                         ("ltx2", ltx2_model(), ltx.FAMILY_LTX2, convert_ltx2_transformer_to_diffusers)):
        state = randomized(model)
        model.save_pretrained(folder / f"{kind}-transformer")
        native = to_native(state, family)
        save_file(native, str(folder / f"{kind}.safetensors"))
        save_file({LDM + k: v for k, v in native.items()}, str(folder / f"{kind}-comfy.safetensors"))
        back = lambda p, convert=convert: convert(load_file(str(p)))  # noqa: E731
        found[kind] = (folder / f"{kind}.safetensors", state, back)
        found[f"{kind}-comfy"] = (folder / f"{kind}-comfy.safetensors", state, back)
        found[f"{kind}-diffusers"] = (folder / f"{kind}-transformer", state, load_folder)
    return found


def test_native_files_are_what_diffusers_reads(bases):
    for name in ("ltxv", "ltxv-comfy", "ltx2", "ltx2-comfy"):
        path, state, back = bases[name]
        converted = back(path)
        assert converted.keys() == state.keys(), (name, converted.keys() ^ state.keys())
        assert all(torch.equal(converted[k], state[k]) for k in state), name
    assert "audio_patchify_proj.weight" in load_file(str(bases["ltx2"][0]))


@pytest.mark.parametrize("name,layout,family", [
    ("ltxv", "ltx-video-native", "LTX-Video"), ("ltxv-comfy", "ltx-video-native", "LTX-Video"),
    ("ltxv-diffusers", "ltx-video-diffusers", "LTX-Video"), ("ltx2", "ltx2-native", "LTX-2"),
    ("ltx2-comfy", "ltx2-native", "LTX-2"), ("ltx2-diffusers", "ltx2-diffusers", "LTX-2")])
def test_inspect_names_family(run_cli, bases, name, layout, family):
    report = json.loads(ok(run_cli("inspect", bases[name][0], "--json")).stdout)
    assert (report["layout"], report["family"]) == (layout, family)


def test_ltx_video_size_from_block_count():
    from loratool.layouts import ltx

    assert ltx.ltx_video_variant({f"transformer_blocks.{n}.attn1.to_q.weight": (2048, 2048) for n in range(28)}) == "2B"
    assert ltx.ltx_video_variant({f"transformer_blocks.{n}.attn1.to_q.weight": (4096, 4096) for n in range(48)}) == "13B"


# --- LoRAs in every dialect -----------------------------------------------------------------------------

LTXV_NATIVE = ("patchify_proj", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
               "caption_projection.linear_2", "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_k",
               "transformer_blocks.0.attn2.to_out.0", "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
               "proj_out")
LTX2_NATIVE = LTXV_NATIVE + ("audio_patchify_proj", "av_ca_a2v_gate_adaln_single.linear",
                             "audio_adaln_single.emb.timestep_embedder.linear_2", "av_ca_video_scale_shift_adaln_single.linear",
                             "transformer_blocks.0.audio_to_video_attn.to_q", "transformer_blocks.1.video_to_audio_attn.to_k",
                             "transformer_blocks.0.audio_ff.net.2", "transformer_blocks.1.audio_attn2.to_v",
                             "audio_proj_out", "audio_caption_projection.linear_1")
#: Dialects and whether they name modules natively (musubi, ComfyUI, Mochi) or as diffusers does.
DIALECTS = {"musubi": True, "comfyui": True, "comfyui-no-alpha": True, "mochi": True, "diffusers": False,
            "onetrainer": False, "lycoris-loha": False, "lycoris-lokr": False}


def lora_file(dialect: str, natives, family, state, seed: int = 1):
    """(LoRA state, diffusers module -> float64 ΔW) in `dialect` on the modules `natives` name."""
    modules = {native: (family.native_to_diffusers(native) or (native,))[0] for native in natives}
    named = {native: native if DIALECTS[dialect] else module for native, module in modules.items()}
    shapes = {named[n]: tuple(state[f"{module}.weight"].shape) for n, module in modules.items()}
    lora, deltas = named_lora(dialect, list(named.values()), shapes, seed)
    return lora, {modules[n]: deltas[named[n]] for n in natives}


def check_merge(run_cli, tmp_path, bases, base_name, lora, deltas, *extra):
    path, state, back = bases[base_name]
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / ("merged" if path.is_dir() else "merged.safetensors")
    ok(run_cli("merge", path, tmp_path / "lora.safetensors", "-o", out, *extra))
    merged = back(out)
    assert merged.keys() == state.keys()
    for key in state:
        module = key.rsplit(".", 1)[0]
        expected = state[key].double() + (deltas[module] if key.endswith(".weight") and module in deltas else 0)
        assert rel(merged[key], expected) < 1e-6, (base_name, key)
    assert sum(not torch.equal(merged[k], state[k]) for k in state) == len(deltas)


@pytest.mark.parametrize("kind", ["ltxv", "ltx2"])
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_loras_merge_into_every_base(run_cli, tmp_path, bases, kind, dialect):
    from loratool.layouts import ltx

    family, natives = (ltx.FAMILY, LTXV_NATIVE) if kind == "ltxv" else (ltx.FAMILY_LTX2, LTX2_NATIVE)
    lora, deltas = lora_file(dialect, natives, family, bases[kind][1])
    for base in (kind, f"{kind}-comfy", f"{kind}-diffusers"):
        check_merge(run_cli, tmp_path / base, bases, base, lora, deltas)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    report = json.loads(ok(run_cli("inspect", tmp_path / "lora.safetensors", "--json")).stdout)
    assert report["family"] == family.name


def diffusers_fused(model, state, converted) -> dict[str, torch.Tensor]:
    model.load_state_dict(state)
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="lora")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return model.state_dict()


def test_ltx_video_against_diffusers_lora_path(run_cli, tmp_path, bases):
    """diffusers' LTX-Video path (`_convert_non_diffusers_ltxv_lora_to_diffusers`, PEFT, fuse) agrees
    with loratool on the blocks when the file has no `.alpha`; with `.alpha` it applies B@A unscaled
    (the alpha is ignored) where loratool, ComfyUI and the trainers apply alpha/r; and it keeps
    `patchify_proj`/`adaln_single` unrenamed, so diffusers drops those modules with a warning."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltxv_lora_to_diffusers

    from loratool.layouts import ltx

    path, state, _ = bases["ltxv"]
    blocks = [m for m in LTXV_NATIVE if m.startswith("transformer_blocks.")]
    for dialect in ("comfyui-no-alpha", "comfyui"):
        lora, deltas = lora_file(dialect, LTXV_NATIVE, ltx.FAMILY, state, seed=4)
        lora = {k: v.float() for k, v in lora.items()}
        check_merge(run_cli, tmp_path / dialect, bases, "ltxv", lora, deltas)
        ours = load_file(str(tmp_path / dialect / "merged.safetensors"))
        converted = _convert_non_diffusers_ltxv_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
        assert "transformer.patchify_proj.lora_A.weight" in converted  # not proj_in: no such module in diffusers
        theirs = diffusers_fused(ltxv_model(), state, converted)
        assert torch.equal(theirs["proj_in.weight"], state["proj_in.weight"])  # dropped
        for module in blocks:
            key = f"{module}.weight"
            if dialect == "comfyui-no-alpha":
                assert rel(ours[key], theirs[key]) < 1e-5, key
            else:  # diffusers: W + B@A; loratool: W + alpha/r·B@A (alpha 3, r 2)
                name = f"diffusion_model.{module}"
                unscaled = lora[f"{name}.lora_B.weight"].double() @ lora[f"{name}.lora_A.weight"].double()
                assert rel(theirs[key], state[key].double() + unscaled) < 1e-5, key
                assert rel(ours[key], state[key].double() + 1.5 * unscaled) < 1e-6, key


def test_ltx2_against_diffusers_lora_path(run_cli, tmp_path, bases):
    """diffusers' LTX-2 path renames every native module (top level too) and agrees with loratool
    when there is no `.alpha`; with `.alpha` it too applies B@A unscaled."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    from loratool.layouts import ltx

    path, state, _ = bases["ltx2"]
    for dialect in ("comfyui-no-alpha", "comfyui"):
        lora, deltas = lora_file(dialect, LTX2_NATIVE, ltx.FAMILY_LTX2, state, seed=6)
        lora = {k: v.float() for k, v in lora.items()}
        check_merge(run_cli, tmp_path / dialect, bases, "ltx2", lora, deltas)
        ours = bases["ltx2"][2](tmp_path / dialect / "merged.safetensors")
        converted = _convert_non_diffusers_ltx2_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
        theirs = diffusers_fused(ltx2_model(), state, converted)
        for native in LTX2_NATIVE:
            module = (ltx.FAMILY_LTX2.native_to_diffusers(native) or (native,))[0]
            key = f"{module}.weight"
            if dialect == "comfyui-no-alpha":
                assert rel(ours[key], theirs[key]) < 1e-5, key
            else:
                name = f"diffusion_model.{native}"
                unscaled = lora[f"{name}.lora_B.weight"].double() @ lora[f"{name}.lora_A.weight"].double()
                assert rel(theirs[key], state[key].double() + unscaled) < 1e-5, key


@pytest.mark.parametrize("kind", ["ltxv", "ltx2"])
def test_convert_round_trips(run_cli, tmp_path, bases, kind):
    """musubi (native names) -> diffusers names against the native file -> kohya against the diffusers
    folder: the same ΔW per module, under diffusers' names."""
    from loratool.layouts import ltx

    family, natives = (ltx.FAMILY, LTXV_NATIVE) if kind == "ltxv" else (ltx.FAMILY_LTX2, LTX2_NATIVE)
    lora, deltas = lora_file("musubi", natives, family, bases[kind][1], seed=9)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ok(run_cli("convert", tmp_path / "lora.safetensors", "--to", "diffusers", "--base", bases[kind][0],
               "-o", tmp_path / "diffusers.safetensors"))
    ok(run_cli("convert", tmp_path / "diffusers.safetensors", "--to", "kohya", "--base", bases[f"{kind}-diffusers"][0],
               "-o", tmp_path / "kohya.safetensors"))
    as_diffusers, as_kohya = load_file(str(tmp_path / "diffusers.safetensors")), load_file(str(tmp_path / "kohya.safetensors"))
    with safe_open(str(tmp_path / "diffusers.safetensors"), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert not config["transformer.alpha_pattern"] and not config["transformer.rank_pattern"]
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in as_diffusers} == set(deltas)
    for module, delta in deltas.items():
        a, b = as_diffusers[f"transformer.{module}.lora_A.weight"], as_diffusers[f"transformer.{module}.lora_B.weight"]
        assert rel(b.double() @ a.double() * config["transformer.lora_alpha"] / config["transformer.r"], delta) < 1e-6
        name = "lora_unet_" + flat(module)
        down, up = as_kohya[f"{name}.lora_down.weight"], as_kohya[f"{name}.lora_up.weight"]
        assert rel(up.double() @ down.double() * float(as_kohya[f"{name}.alpha"]) / down.shape[0], delta) < 1e-6


def test_ltx2_lora_on_ltx_video_refused_then_skipped(run_cli, tmp_path, bases):
    """An LTX-2 LoRA's audio modules on an LTX-Video base: refused in one line; --skip-missing merges the
    video modules."""
    from loratool.layouts import ltx

    video = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2")
    natives = (*video, "transformer_blocks.0.audio_attn1.to_q", "audio_patchify_proj")
    shapes = {**bases["ltxv"][1], **{k: v for k, v in bases["ltx2"][1].items() if "audio" in k}}
    lora, deltas = lora_file("musubi", natives, ltx.FAMILY_LTX2, shapes)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", bases["ltxv"][0], tmp_path / "lora.safetensors", "-o", out), out,
                   "2 module(s)", "audio", "--skip-missing")
    check_merge(run_cli, tmp_path / "skip", bases, "ltxv", lora, {m: deltas[m] for m in video}, "--skip-missing")


def test_ltx23_prompt_adaln_single(tmp_path, run_cli):
    """LTX-2.3's prompt modulation: diffusers' single-file converter leaves `prompt_adaln_single` as it
    is (its LoRA converter renames it to `prompt_adaln`); loratool's table maps it both ways."""
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel

    from loratool.layouts import layout_of, ltx

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                                        audio_num_attention_heads=2, audio_attention_head_dim=4,
                                        audio_cross_attention_dim=8, num_layers=1, caption_channels=12,
                                        cross_attn_mod=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert "prompt_adaln.linear.weight" in state
    native = to_native(state, ltx.FAMILY_LTX2)
    assert "prompt_adaln_single.linear.weight" in native
    assert "prompt_adaln_single.linear.weight" in convert_ltx2_transformer_to_diffusers(dict(native))  # not renamed
    layout = layout_of({k: tuple(v.shape) for k, v in native.items()}, tmp_path)
    assert layout.family == "LTX-2"
    pieces = layout.resolve(["diffusion_model.prompt_adaln_single.linear", "transformer.audio_prompt_adaln.linear"])
    assert [p.target.weight for ps in pieces.values() for p in ps] == ["prompt_adaln_single.linear.weight",
                                                                       "audio_prompt_adaln_single.linear.weight"]


@pytest.mark.parametrize("key,value,family", [("ss_base_model_version", "ltx2", "LTX-2"),
                                              ("modelspec.architecture", "ltx-video", "LTX-Video")])
def test_lora_family_from_metadata(run_cli, tmp_path, key, value, family):
    lora = {"lora_unet_some_module.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_some_module.lora_up.weight": torch.zeros(4, 2)}
    save_file(lora, str(tmp_path / "lora.safetensors"), metadata={key: value})
    report = json.loads(ok(run_cli("inspect", tmp_path / "lora.safetensors", "--json")).stdout)
    assert (report["family"], report["family_from"]) == (family, "metadata")


@pytest.mark.parametrize("base", ["ltx2", "ltx2-comfy", "ltx2-diffusers"])
def test_diff_and_diff_b_merge(run_cli, tmp_path, bases, base):
    """Full weight and bias deltas (`.diff`/`.diff_b`, as video trainers write them) beside LoRA modules,
    on native names: added as they are."""
    from loratool.layouts import ltx

    state = bases["ltx2"][1]
    lora, deltas = lora_file("comfyui", LTX2_NATIVE[:3], ltx.FAMILY_LTX2, state, seed=2)
    generator = torch.Generator().manual_seed(8)
    bias_deltas = {}
    for native in ("transformer_blocks.1.audio_attn1.to_out.0", "av_ca_v2a_gate_adaln_single.linear"):
        module = (ltx.FAMILY_LTX2.native_to_diffusers(native) or (native,))[0]
        lora[f"diffusion_model.{native}.diff"] = torch.randn(state[f"{module}.weight"].shape, generator=generator)
        lora[f"diffusion_model.{native}.diff_b"] = torch.randn(state[f"{module}.bias"].shape, generator=generator)
        deltas[module] = lora[f"diffusion_model.{native}.diff"].double()
        bias_deltas[module] = lora[f"diffusion_model.{native}.diff_b"].double()
    path, _, back = bases[base]
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / ("merged" if path.is_dir() else "merged.safetensors")
    ok(run_cli("merge", path, tmp_path / "lora.safetensors", "-o", out))
    merged = back(out)
    for key in state:
        module, _, param = key.rpartition(".")
        table = deltas if param == "weight" else bias_deltas if param == "bias" else {}
        assert rel(merged[key], state[key].double() + table.get(module, 0)) < 1e-6, key
