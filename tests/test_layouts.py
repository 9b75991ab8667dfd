"""Base layouts against diffusers' own single-file converters: the LDM UNet table, CLIP and OpenCLIP
text encoders (fused in_proj rows), Flux in both namings; kohya LoRAs of both naming styles merged
into both layouts and compared with a float64 W + alpha/r·up@down computed here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import load_folder, ok, rel

FIXTURES = Path(__file__).parent.parent / "fixtures"
LDM = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."

UNET_CONFIGS = {
    # SD1/SD2 shape: attention on the outer levels, none on the deepest; 1×1-conv proj_in.
    "sd1": dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                use_linear_projection=False),
    # SDXL shape: no attention on the first level, linear proj_in, two transformer blocks deep down.
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, transformer_layers_per_block=(1, 1, 2)),
}


def flat(module: str) -> str:
    return module.replace(".", "_")


def make_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                                **UNET_CONFIGS[kind]).eval()


def to_ldm_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in LDM names, through loratool's table (checked by diffusers below)."""
    from loratool.layouts import unet

    modules = [k.rsplit(".", 1)[0] for k in state]
    per_level, attention = unet.diffusers_per_level(modules), unet.up_levels_with_attention(modules)
    out = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        out[f"{LDM}{unet.diffusers_to_ldm(module, per_level, attention.__contains__)}.{param}"] = tensor.clone()
    return out


def clip_pair(seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=50, max_position_embeddings=16, projection_dim=8)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def to_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP state dict (transformers 5 names) as OpenCLIP stores it, written out by hand here."""
    out = {}
    leaves = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        hf = f"encoder.layers.{n}."
        for param in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{param}"] = torch.cat(
                [state[f"{hf}self_attn.{p}_proj.{param}"] for p in "qkv"])
            for leaf, open_leaf in leaves.items():
                out[f"{prefix}transformer.resblocks.{n}.{open_leaf}.{param}"] = state[f"{hf}{leaf}.{param}"].clone()
    out[prefix + "token_embedding.weight"] = state["embeddings.token_embedding.weight"].clone()
    out[prefix + "positional_embedding"] = state["embeddings.position_embedding.weight"].clone()
    out[prefix + "ln_final.weight"] = state["final_layer_norm.weight"].clone()
    out[prefix + "ln_final.bias"] = state["final_layer_norm.bias"].clone()
    out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    return out


def hf_state(model) -> dict[str, torch.Tensor]:
    """State dict in transformers 5 names (CLIPTextModelWithProjection still nests `text_model.`)."""
    return {k.removeprefix("text_model."): v.detach().clone() for k, v in model.state_dict().items()
            if "position_ids" not in k}


def random_lora(modules: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], seed: int, rank: int = 2):
    """kohya tensors: name -> (down shape, up shape); alpha = 3 so scale = 1.5."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (down, up) in modules.items():
        state[f"{name}.lora_down.weight"] = torch.randn(down, generator=generator) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(up, generator=generator) * 0.1
        state[f"{name}.alpha"] = torch.tensor(3.0)
    return state


def kohya_delta(state: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    up, down = state[f"{name}.lora_up.weight"].double(), state[f"{name}.lora_down.weight"].double()
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * state[f"{name}.alpha"].item() / down.shape[0]


# --- the UNet table against diffusers' converter ---------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def unet_files(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"unet-{request.param}")
    unet = make_unet(request.param)
    unet.save_pretrained(folder / "unet")
    state = hf_state(unet)
    save_file(to_ldm_unet(state), str(folder / "ldm.safetensors"))
    return request.param, folder, state, dict(unet.config)


def diffusers_from_ldm(path: Path, config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(load_file(str(path)), config)


def test_ldm_unet_table_matches_diffusers_converter(unet_files):
    """diffusers' own single-file converter reads our LDM names back into the same UNet, tensor for
    tensor, and the LDM layout resolves every module to its diffusers name."""
    from loratool.layouts import layout_of

    _, folder, state, config = unet_files
    back = diffusers_from_ldm(folder / "ldm.safetensors", config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    ldm = load_file(str(folder / "ldm.safetensors"))
    layout = layout_of({k: tuple(v.shape) for k, v in ldm.items()}, folder)
    assert layout.kind == "ldm-single-file"
    modules = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")}
    assert set(layout.components["unet"].targets) == modules


def pairs_from_diffusers(ldm: dict[str, torch.Tensor], config: dict) -> dict[str, str]:
    """diffusers module -> LDM module, as diffusers' converter moves tensors (matched by identity)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    marked = {k: torch.full((1,), float(i)) for i, k in enumerate(ldm)}
    converted = convert_ldm_unet_checkpoint(dict(marked), config)
    by_value = {float(v): k for k, v in marked.items()}
    return {k.rsplit(".", 1)[0]: by_value[float(v)].removeprefix(LDM).rsplit(".", 1)[0]
            for k, v in converted.items() if k.endswith(".weight")}


UNET_TARGETS = ("attn1.to_q", "attn2.to_k", "proj_in", "ff.net.0.proj", "resnets.0.conv1", "time_emb_proj",
                "downsamplers.0.conv", "upsamplers.0.conv", "time_embedding.linear_1", "conv_in")


@pytest.mark.parametrize("names", ["diffusers", "ldm"])
@pytest.mark.parametrize("into", ["ldm", "diffusers"])
def test_kohya_lora_of_either_naming_merges_into_either_layout(run_cli, tmp_path, unet_files, names, into):
    kind, folder, state, config = unet_files
    ldm = load_file(str(folder / "ldm.safetensors"))
    pairs = pairs_from_diffusers(ldm, config)
    chosen = sorted(m for m in pairs if any(m.endswith(t) for t in UNET_TARGETS))
    modules = {}
    for module in chosen:
        weight = state[f"{module}.weight"]
        name = "lora_unet_" + flat(module if names == "diffusers" else pairs[module])
        if weight.dim() == 4 and weight.shape[2:] != (1, 1):
            modules[name] = ((2, weight.shape[1], *weight.shape[2:]), (weight.shape[0], 2, 1, 1))
        elif module.endswith("proj_in"):  # the other kind: 4-D factors on a linear, 2-D on a 1×1 conv
            modules[name] = ((2, weight.shape[1], 1, 1), (weight.shape[0], 2, 1, 1)) if weight.dim() == 2 else \
                ((2, weight.shape[1]), (weight.shape[0], 2))
        else:
            modules[name] = ((2, weight.shape[1]), (weight.shape[0], 2))
    lora = random_lora(modules, seed=7)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    base = folder / ("ldm.safetensors" if into == "ldm" else "unet")
    out = tmp_path / ("merged.safetensors" if into == "ldm" else "merged")
    ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out))
    merged = diffusers_from_ldm(out, config) if into == "ldm" else load_folder(out)
    changed = 0
    for module in chosen:
        name = "lora_unet_" + flat(module if names == "diffusers" else pairs[module])
        key = f"{module}.weight"
        expected = state[key].double() + kohya_delta(lora, name, tuple(state[key].shape))
        assert rel(merged[key], expected) < 1e-6, (key, kind)
        changed += 1
    assert changed == len(chosen) >= 10
    assert sum(not torch.equal(merged[k], state[k]) for k in state) == len(chosen)


# --- text encoders: CLIP with and without text_model., OpenCLIP in_proj rows -----------------------------


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """A tiny SDXL-shaped single file: LDM UNet, CLIP-L under embedders.0 (transformers 4 names) and
    OpenCLIP bigG under embedders.1 (fused in_proj, transposed text_projection)."""
    folder = tmp_path_factory.mktemp("sdxl")
    unet = make_unet("sdxl", seed=1)
    clip_l, clip_g = clip_pair(2), clip_pair(3, projection=True)
    state = to_ldm_unet(hf_state(unet))
    state.update({f"{SDXL_TE1}text_model.{k}": v for k, v in hf_state(clip_l).items()})
    state.update(to_open_clip(hf_state(clip_g), SDXL_TE2))
    save_file(state, str(folder / "sdxl.safetensors"))
    return folder / "sdxl.safetensors", hf_state(clip_l), hf_state(clip_g), clip_g


def test_open_clip_file_is_what_diffusers_reads(sdxl_file):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    path, clip_l, clip_g, model = sdxl_file
    state = load_file(str(path))
    big_g = convert_open_clip_checkpoint(model, state, prefix=SDXL_TE2)
    assert {k.removeprefix("text_model."): v for k, v in big_g.items()}.keys() == clip_g.keys()
    assert all(torch.equal(big_g[k if k == "text_projection.weight" else f"text_model.{k}"], v)
               for k, v in clip_g.items())
    small = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(SDXL_TE1)})
    assert all(torch.equal(small[f"text_model.{k}"], v) for k, v in clip_l.items())


@pytest.mark.parametrize("text_model", [True, False])
def test_sdxl_text_encoder_loras_merge_into_fused_rows(run_cli, tmp_path, sdxl_file, text_model):
    """lora_te1_/lora_te2_ names in HF terms (with or without transformers 4's text_model.) land in
    CLIP-L's own tensors and in row slices of bigG's in_proj_weight; text_projection is transposed."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    path, clip_l, clip_g, model = sdxl_file
    level = "text_model_" if text_model else ""
    targets = {"lora_te1_": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"],
               "lora_te2_": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj",
                             "encoder.layers.1.self_attn.v_proj", "encoder.layers.1.self_attn.out_proj",
                             "encoder.layers.0.mlp.fc2"]}
    modules, expected_names = {}, {}
    for prefix, names in targets.items():
        reference = clip_l if prefix == "lora_te1_" else clip_g
        for module in names:
            shape = reference[f"{module}.weight"].shape
            name = prefix + level + flat(module)
            modules[name] = ((2, shape[1]), (shape[0], 2))
            expected_names[name] = (prefix, module)
    modules["lora_te2_text_projection"] = ((2, 8), (8, 2))
    expected_names["lora_te2_text_projection"] = ("lora_te2_", "text_projection")
    lora = random_lora(modules, seed=11)
    save_file(lora, str(tmp_path / "te.safetensors"))
    ok(run_cli("merge", path, tmp_path / "te.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    big_g = convert_open_clip_checkpoint(model, merged, prefix=SDXL_TE2)
    small = convert_ldm_clip_checkpoint({k: v for k, v in merged.items() if k.startswith(SDXL_TE1)})
    for name, (prefix, module) in expected_names.items():
        reference, converted = (clip_l, small) if prefix == "lora_te1_" else (clip_g, big_g)
        key = f"{module}.weight"
        got = converted[key if module == "text_projection" else f"text_model.{key}"]
        expected = reference[key].double() + kohya_delta(lora, name, tuple(reference[key].shape))
        assert rel(got, expected) < 1e-6, name
    untouched = clip_g["encoder.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(big_g["text_model.encoder.layers.1.self_attn.q_proj.weight"], untouched)
    base_report = json.loads(ok(run_cli("inspect", path, "--json")).stdout)
    assert (base_report["layout"], base_report["family"]) == ("ldm-single-file", "SDXL")
    assert base_report["components"] == {"unet": "ldm-unet", "text_encoder": "hf-clip", "text_encoder_2": "open-clip"}
    lora_report = json.loads(ok(run_cli("inspect", tmp_path / "te.safetensors", "--json")).stdout)
    assert (lora_report["family"], lora_report["family_from"]) == ("SDXL", "names")  # lora_te2_, no metadata


def test_sd1_single_file_and_pipeline_folder(run_cli, tmp_path):
    """One kohya file (UNet in LDM names, text encoder in transformers 4 names) merges into an SD1
    single file and into a pipeline folder saved by transformers 5; the folder keeps its layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    unet, text = make_unet("sd1", seed=4), clip_pair(5)
    unet_state, text_state = hf_state(unet), hf_state(text)
    single = to_ldm_unet(unet_state)
    single.update({f"{SD1_TE}text_model.{k}": v for k, v in text_state.items()})
    single["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    save_file(single, str(tmp_path / "sd1.safetensors"))
    pipeline = tmp_path / "pipeline"
    unet.save_pretrained(pipeline / "unet")
    text.save_pretrained(pipeline / "text_encoder")
    (pipeline / "scheduler").mkdir()
    (pipeline / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "PNDMScheduler"}')
    (pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    modules = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ((2, 16), (16, 2)),
               "lora_te_text_model_encoder_layers_1_self_attn_v_proj": ((2, 8), (8, 2))}
    lora = random_lora(modules, seed=13)
    lora_path = tmp_path / "sd1-lora.safetensors"
    save_file(lora, str(lora_path), metadata={"ss_base_model_version": "sd_v1"})

    ok(run_cli("merge", tmp_path / "sd1.safetensors", lora_path, "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    text_key = "encoder.layers.1.self_attn.v_proj.weight"
    unet_key = LDM + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    te = convert_ldm_clip_checkpoint(merged)
    assert rel(te[f"text_model.{text_key}"], text_state[text_key].double() + kohya_delta(
        lora, "lora_te_text_model_encoder_layers_1_self_attn_v_proj", (8, 8))) < 1e-6
    assert rel(merged[unet_key], unet_state[f"{q}.weight"].double() + kohya_delta(
        lora, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (16, 16))) < 1e-6
    assert torch.equal(merged["first_stage_model.decoder.conv_in.weight"], single["first_stage_model.decoder.conv_in.weight"])

    ok(run_cli("merge", pipeline, lora_path, "-o", tmp_path / "merged-pipeline"))
    out = tmp_path / "merged-pipeline"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        p.relative_to(pipeline).as_posix() for p in pipeline.rglob("*"))
    assert (out / "scheduler" / "scheduler_config.json").read_text() == '{"_class_name": "PNDMScheduler"}'
    merged_unet, merged_text = load_folder(out / "unet"), load_folder(out / "text_encoder")
    assert torch.equal(merged_unet[f"{q}.weight"], merged[unet_key])
    assert rel(merged_text[text_key], te[f"text_model.{text_key}"]) < 1e-7

    report = json.loads(ok(run_cli("inspect", tmp_path / "sd1.safetensors", "--json")).stdout)
    assert report["layout"] == "ldm-single-file" and report["components"] == {"unet": "ldm-unet",
                                                                               "text_encoder": "hf-clip"}
    assert json.loads(ok(run_cli("inspect", pipeline, "--json")).stdout)["layout"] == "diffusers-pipeline"
    lora_report = json.loads(ok(run_cli("inspect", lora_path, "--json")).stdout)
    assert (lora_report["family"], lora_report["family_from"]) == ("SD1", "metadata")

    # convert to PEFT with diffusers names, which PEFT loads onto the diffusers UNet, and back to kohya
    from peft import PeftModel

    ok(run_cli("convert", lora_path, "--to", "peft", "--base", tmp_path / "sd1.safetensors", "--component", "unet",
               "-o", tmp_path / "peft"))
    loaded = PeftModel.from_pretrained(make_unet("sd1", seed=4), str(tmp_path / "peft"))
    delta = loaded.base_model.model.get_submodule(q).get_delta_weight("default").double()
    assert rel(delta, kohya_delta(lora, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (16, 16))) < 1e-6
    ok(run_cli("convert", lora_path, "--to", "kohya", "--base", tmp_path / "sd1.safetensors",
               "-o", tmp_path / "diffusers-names.safetensors"))
    back = load_file(str(tmp_path / "diffusers-names.safetensors"))
    assert torch.equal(back[f"lora_unet_{flat(q)}.lora_down.weight"],
                       lora["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"])
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in back


# --- Flux: fused BFL tensors and separate diffusers ones -------------------------------------------------

H = 3072  # diffusers' Flux converters hard-code the hidden size; the input width can stay tiny
WIDTH = 4


def flux_diffusers_shapes(double: int = 1, single: int = 1) -> dict[str, tuple[int, ...]]:
    shapes = {"x_embedder.weight": (H, WIDTH), "proj_out.weight": (WIDTH, H), "norm_out.linear.weight": (2 * H, WIDTH)}
    for i in range(double):
        for leaf in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "attn.to_out.0", "ff.net.2"):
            shapes[f"transformer_blocks.{i}.{leaf}.weight"] = (H, WIDTH)
    for i in range(single):
        for leaf in ("attn.to_q", "attn.to_k", "attn.to_v"):
            shapes[f"single_transformer_blocks.{i}.{leaf}.weight"] = (H, WIDTH)
        shapes[f"single_transformer_blocks.{i}.proj_mlp.weight"] = (4 * H, WIDTH)
        shapes[f"single_transformer_blocks.{i}.proj_out.weight"] = (WIDTH, 5 * H)
    return shapes


def test_fused_flux_lora_splits_as_diffusers_does(run_cli, tmp_path):
    """A kohya Flux LoRA on BFL's fused qkv/linear1 against a diffusers-named transformer: split B by
    rows exactly as diffusers' own kohya-Flux converter does, and merged into each part."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    generator = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=generator) for k, s in flux_diffusers_shapes().items()}
    save_file(base, str(tmp_path / "transformer.safetensors"))
    modules = {"lora_unet_double_blocks_0_img_attn_qkv": ((2, WIDTH), (3 * H, 2)),
               "lora_unet_double_blocks_0_txt_attn_qkv": ((2, WIDTH), (3 * H, 2)),
               "lora_unet_single_blocks_0_linear1": ((2, WIDTH), (7 * H, 2)),
               "lora_unet_final_layer_adaLN_modulation_1": ((2, WIDTH), (2 * H, 2))}
    lora = random_lora(modules, seed=3)
    save_file(lora, str(tmp_path / "flux.safetensors"))
    converted = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    oracle = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}

    ok(run_cli("convert", tmp_path / "flux.safetensors", "--to", "diffusers", "--base", tmp_path / "transformer.safetensors",
               "-o", tmp_path / "split.safetensors"))
    ours = load_file(str(tmp_path / "split.safetensors"))
    assert set(ours) == set(oracle)
    # diffusers folds alpha/r into A and B, except on final_layer, where it drops the alpha ("TODO: alphas"
    # in its source; sd-scripts and ComfyUI apply it): that one module's product gets alpha/r here.
    unscaled = {"transformer.norm_out.linear": 1.5}
    for key in oracle:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            theirs = oracle[f"{module}.lora_B.weight"].double() @ oracle[f"{module}.lora_A.weight"].double()
            theirs = theirs * unscaled.get(module, 1.0)
            mine = ours[f"{module}.lora_B.weight"].double() @ ours[f"{module}.lora_A.weight"].double() * 1.5
            assert rel(mine, theirs) < 1e-6, module

    ok(run_cli("merge", tmp_path / "transformer.safetensors", tmp_path / "flux.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    for module in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj",
                   "single_transformer_blocks.0.proj_mlp", "norm_out.linear"):
        theirs = oracle[f"transformer.{module}.lora_B.weight"].double() @ oracle[f"transformer.{module}.lora_A.weight"].double()
        theirs = theirs * unscaled.get(f"transformer.{module}", 1.0)
        assert rel(merged[f"{module}.weight"], base[f"{module}.weight"].double() + theirs) < 1e-6, module
    assert torch.equal(merged["x_embedder.weight"], base["x_embedder.weight"])

    # OneTrainer's lora_transformer_ + diffusers names and ComfyUI's dotted BFL names, in one file
    other = random_lora({"lora_transformer_transformer_blocks_0_attn_to_out_0": ((2, WIDTH), (H, 2)),
                         "diffusion_model.double_blocks.0.txt_attn.qkv": ((2, WIDTH), (3 * H, 2))}, seed=4)
    save_file(other, str(tmp_path / "other.safetensors"))
    ok(run_cli("merge", tmp_path / "transformer.safetensors", tmp_path / "other.safetensors", "-o", tmp_path / "o.safetensors"))
    merged = load_file(str(tmp_path / "o.safetensors"))
    out = "transformer_blocks.0.attn.to_out.0.weight"
    assert rel(merged[out], base[out].double() + kohya_delta(
        other, "lora_transformer_transformer_blocks_0_attn_to_out_0", (H, WIDTH))) < 1e-6
    fused = kohya_delta(other, "diffusion_model.double_blocks.0.txt_attn.qkv", (3 * H, WIDTH))
    for i, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        key = f"transformer_blocks.0.attn.{part}.weight"
        assert rel(merged[key], base[key].double() + fused[i * H:(i + 1) * H]) < 1e-6, key


def test_split_flux_lora_merges_into_fused_bfl_rows(run_cli, tmp_path):
    """A diffusers-named Flux LoRA (separate q/k/v) merges into row slices of a BFL file's fused qkv and
    linear1; norm_out's halves land swapped; a BFL-named LoRA into the BFL file merges as it is."""
    width = 8  # a real-proportioned tiny Flux: q/k/v as wide as the hidden size
    generator = torch.Generator().manual_seed(1)
    bfl = {"double_blocks.0.img_attn.qkv.weight": (3 * width, width), "double_blocks.0.img_attn.qkv.bias": (3 * width,),
           "double_blocks.0.img_attn.norm.key_norm.scale": (width,),
           "single_blocks.0.linear1.weight": (7 * width, width), "single_blocks.0.linear2.weight": (width, 5 * width),
           "final_layer.adaLN_modulation.1.weight": (2 * width, width)}
    base = {k: torch.randn(s, generator=generator) for k, s in bfl.items()}
    save_file(base, str(tmp_path / "flux1.safetensors"))
    modules = {"transformer.transformer_blocks.0.attn.to_k": (2, width, width),
               "transformer.single_transformer_blocks.0.attn.to_v": (2, width, width),
               "transformer.single_transformer_blocks.0.proj_mlp": (2, width, 4 * width),
               "transformer.norm_out.linear": (2, width, 2 * width)}
    lora = {}
    for name, (r, fan_in, fan_out) in modules.items():
        lora[f"{name}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator)
        lora[f"{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator)
    save_file(lora, str(tmp_path / "diffusers-lora.safetensors"))
    ok(run_cli("merge", tmp_path / "flux1.safetensors", tmp_path / "diffusers-lora.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))

    def delta(name):
        return lora[f"{name}.lora_B.weight"].double() @ lora[f"{name}.lora_A.weight"].double()

    expected = {k: v.double().clone() for k, v in base.items()}
    expected["double_blocks.0.img_attn.qkv.weight"][width:2 * width] += delta("transformer.transformer_blocks.0.attn.to_k")
    linear1 = expected["single_blocks.0.linear1.weight"]
    linear1[2 * width:3 * width] += delta("transformer.single_transformer_blocks.0.attn.to_v")
    linear1[3 * width:] += delta("transformer.single_transformer_blocks.0.proj_mlp")
    norm = delta("transformer.norm_out.linear")  # diffusers (scale, shift) -> BFL (shift, scale)
    expected["final_layer.adaLN_modulation.1.weight"] += torch.cat([norm[width:], norm[:width]])
    for key in base:
        assert rel(merged[key], expected[key]) < 1e-6, key

    # the same file as ComfyUI saves it, under model.diffusion_model.
    save_file({f"{LDM}{k}": v for k, v in base.items()}, str(tmp_path / "comfy.safetensors"))
    ok(run_cli("merge", tmp_path / "comfy.safetensors", tmp_path / "diffusers-lora.safetensors", "-o",
               tmp_path / "mc.safetensors"))
    prefixed = load_file(str(tmp_path / "mc.safetensors"))
    assert all(torch.equal(prefixed[f"{LDM}{k}"], merged[k]) for k in base)

    bfl_named = random_lora({"lora_unet_double_blocks_0_img_attn_qkv": ((2, width), (3 * width, 2))}, seed=5)
    save_file(bfl_named, str(tmp_path / "bfl-lora.safetensors"))
    ok(run_cli("merge", tmp_path / "flux1.safetensors", tmp_path / "bfl-lora.safetensors", "-o", tmp_path / "m2.safetensors"))
    qkv = load_file(str(tmp_path / "m2.safetensors"))["double_blocks.0.img_attn.qkv.weight"]
    assert rel(qkv, base["double_blocks.0.img_attn.qkv.weight"].double() + kohya_delta(
        bfl_named, "lora_unet_double_blocks_0_img_attn_qkv", (3 * width, width))) < 1e-6
    report = json.loads(ok(run_cli("inspect", tmp_path / "flux1.safetensors", "--json")).stdout)
    assert (report["layout"], report["family"]) == ("flux-bfl", "Flux")
    assert json.loads(ok(run_cli("inspect", tmp_path / "bfl-lora.safetensors", "--json")).stdout)["family"] == "Flux"


# --- the card's command line, bare PEFT weights, refusals ------------------------------------------------


def test_merge_without_output_names_the_result_and_never_overwrites(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = ok(run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama"))
    assert (tmp_path / "tiny-llama+lora-llama" / "model.safetensors").is_file()
    assert "tiny-llama+lora-llama" in first.stdout
    ok(run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama"))
    assert (tmp_path / "tiny-llama+lora-llama-2" / "model.safetensors").is_file()
    assert load_folder(tmp_path / "tiny-llama+lora-llama").keys() == load_folder(tmp_path / "tiny-llama+lora-llama-2").keys()


def test_bare_peft_weights_need_alpha(run_cli, tmp_path):
    bare = tmp_path / "downloaded.safetensors"
    bare.write_bytes((FIXTURES / "lora-llama" / "adapter_model.safetensors").read_bytes())
    config = json.loads((FIXTURES / "lora-llama" / "adapter_config.json").read_text())
    report = json.loads(ok(run_cli("inspect", bare, "--json")).stdout)
    assert report["format"] == "peft" and report["lora_alpha_known"] is False and report["modules"] == 14
    refused = run_cli("merge", FIXTURES / "tiny-llama", bare, "-o", tmp_path / "m")
    assert refused.code == 2 and "--alpha" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "m").exists()
    ok(run_cli("merge", FIXTURES / "tiny-llama", bare, "--alpha", str(config["lora_alpha"]), "-o", tmp_path / "m"))
    ok(run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", tmp_path / "reference"))
    ours, reference = load_folder(tmp_path / "m"), load_folder(tmp_path / "reference")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_names_that_match_no_layout_are_one_line_and_nothing_is_written(run_cli, tmp_path, unet_files):
    _, folder, _, _ = unet_files
    wrong = random_lora({"lora_unet_double_blocks_0_img_attn_qkv": ((2, 4), (12, 2)),
                         "lora_unet_input_blocks_99_1_proj_in": ((2, 4), (4, 2))}, seed=1)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    result = run_cli("merge", folder / "ldm.safetensors", tmp_path / "wrong.safetensors", "-o", tmp_path / "m.safetensors")
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "lora_unet_double_blocks_0_img_attn_qkv" in result.stderr and "ldm-single-file" in result.stderr
    text_only = random_lora({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((2, 8), (8, 2))}, seed=2)
    save_file(text_only, str(tmp_path / "te.safetensors"))
    missing = run_cli("merge", folder / "unet", tmp_path / "te.safetensors", "-o", tmp_path / "m2")
    assert missing.code == 2 and "no text_encoder" in missing.stderr
    as_file = run_cli("merge", folder / "unet", tmp_path / "te.safetensors", "-o", tmp_path / "m3.safetensors")
    assert as_file.code == 2 and "OUT is a folder too" in as_file.stderr
    assert not any((tmp_path / name).exists() for name in ("m.safetensors", "m2", "m3.safetensors"))


def test_sd2_open_clip_text_encoder_rows(run_cli, tmp_path):
    """SD2 keeps OpenCLIP ViT-H under cond_stage_model.model.: a kohya lora_te_ LoRA on v_proj lands in
    rows [2d, 3d) of in_proj_weight, as diffusers' converter splits them."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "cond_stage_model.model."
    model = clip_pair(9, projection=True)
    reference = hf_state(model)
    single = to_ldm_unet(hf_state(make_unet("sd1", seed=9)))
    single.update(to_open_clip(reference, prefix))
    save_file(single, str(tmp_path / "sd2.safetensors"))
    name = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    lora = random_lora({name: ((2, 8), (8, 2)), "lora_te_text_model_encoder_layers_0_mlp_fc1": ((2, 8), (16, 2))}, 21)
    save_file(lora, str(tmp_path / "te.safetensors"))
    ok(run_cli("merge", tmp_path / "sd2.safetensors", tmp_path / "te.safetensors", "-o", tmp_path / "m.safetensors"))
    converted = convert_open_clip_checkpoint(model, load_file(str(tmp_path / "m.safetensors")), prefix=prefix)
    key = "encoder.layers.1.self_attn.v_proj.weight"
    assert rel(converted[f"text_model.{key}"], reference[key].double() + kohya_delta(lora, name, (8, 8))) < 1e-6
    fc1 = "encoder.layers.0.mlp.fc1.weight"
    assert rel(converted[f"text_model.{fc1}"], reference[fc1].double() + kohya_delta(
        lora, "lora_te_text_model_encoder_layers_0_mlp_fc1", (16, 8))) < 1e-6
    for untouched in ("encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(converted[f"text_model.{untouched}"], reference[untouched])
    report = json.loads(ok(run_cli("inspect", tmp_path / "sd2.safetensors", "--json")).stdout)
    assert (report["family"], report["components"]["text_encoder"]) == ("SD2", "open-clip")
