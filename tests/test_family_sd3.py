"""SD3 / SD3.5 (MMDiT) in both namings, with its CLIP-L, CLIP-G and T5 text encoders.

The native single file is written here from loratool's table and read back by diffusers' own
`convert_sd3_transformer_checkpoint_to_diffusers` tensor for tensor before any test uses it. Merges are
checked against float64 W + alpha/r·B@A computed here, and a diffusers-format LoRA (as
`save_lora_weights` writes it) against PEFT's own merge on a tiny `SD3Transformer2DModel`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_refused, ok, rel

LDM = "model.diffusion_model."
TE = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
      "text_encoder_3": "text_encoders.t5xxl.transformer."}
H = 8  # hidden size: 2 heads of 4
#: Tiny SD3 (no q/k norm) and SD3.5 Medium (RMS q/k norms, MMDiT-X attn2 in block 0) configs.
CONFIGS = {
    "sd3": dict(),
    "sd3.5m": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
}


def tiny_sd3(kind: str, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=H,
                                 pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8,
                                 **CONFIGS[kind]).eval()


def diffusers_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def halves_swapped(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def to_native(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers SD3 state dict in Stability AI's names, through loratool's table alone: each native
    module is its diffusers parts stacked by rows, halves swapped where the table says."""
    from loratool.layouts.sd3 import FAMILY

    modules = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")}
    swapped = FAMILY.swapped({k: tuple(v.shape) for k, v in state.items()})
    native, used = {f"{prefix}pos_embed": state["pos_embed.pos_embed"]}, {"pos_embed.pos_embed"}
    for module, parts in FAMILY.diffusers_groups(modules).items():
        for param in ("weight", "bias"):
            keys = [f"{part}.{param}" for part in parts]
            if not all(k in state for k in keys):
                continue
            tensor = torch.cat([state[k] for k in keys])
            native[f"{prefix}{module}.{param}"] = halves_swapped(tensor) if module in swapped else tensor
            used.update(keys)
    assert used == set(state), sorted(set(state) - used)  # the table covers every tensor
    return native


def text_encoders(seed: int = 5):
    """Tiny CLIP-L, CLIP-G (with projection) and T5 encoder, and their single-file tensors (transformers 4
    names under `text_encoders.*.transformer.`, as SD3 files store them)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = dict(intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=16)
    models = {"text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, projection_dim=8, **clip)),
              "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=12, projection_dim=12, **clip)),
              "text_encoder_3": T5EncoderModel(T5Config(d_model=8, d_kv=4, num_heads=2, d_ff=24, num_layers=2,
                                                        vocab_size=32))}
    single = {}
    for name, model in models.items():
        for key, tensor in model.state_dict().items():
            if "position_ids" in key or (name == "text_encoder" and key == "text_projection.weight"):
                continue  # SD3 files keep no CLIP-L projection (diffusers puts an identity there)
            key = key if key.startswith("text_model.") or name == "text_encoder_3" or key.startswith(
                "text_projection") else f"text_model.{key}"
            single[TE[name] + key] = tensor.detach().clone().contiguous()
    return models, single


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def sd3_files(request, tmp_path_factory):
    """(kind, diffusers state, folder): `native.safetensors` (bare), `single.safetensors` (ComfyUI/SAI:
    `model.diffusion_model.` + the three text encoders), `transformer.safetensors` (diffusers names)."""
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    state = diffusers_state(tiny_sd3(kind))
    save_file(to_native(state), str(folder / "native.safetensors"))
    _, encoders = text_encoders()
    save_file({**to_native(state, LDM), **encoders}, str(folder / "single.safetensors"))
    save_file(state, str(folder / "transformer.safetensors"))
    return kind, state, folder


# --- 1. native names come from diffusers' own converter -----------------------------------------------


@pytest.mark.parametrize("prefix", ["", LDM])
def test_native_file_is_what_diffusers_reads(sd3_files, prefix):
    from diffusers.loaders.single_file_utils import (convert_sd3_t5_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    kind, state, folder = sd3_files
    native = load_file(str(folder / ("native.safetensors" if not prefix else "single.safetensors")))
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in native.items() if k.startswith(prefix) and not k.startswith("text_encoders.")})
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    if prefix:
        models, _ = text_encoders()
        t5 = convert_sd3_t5_checkpoint_to_diffusers(native)
        assert all(torch.equal(t5[k], v) for k, v in models["text_encoder_3"].state_dict().items())


# --- 2. inspect ---------------------------------------------------------------------------------------


def test_inspect_names_family_variant_and_components(run_cli, sd3_files):
    kind, _, folder = sd3_files
    variant = "SD3.5 Medium" if kind == "sd3.5m" else "SD3"  # tiny widths: the size is not 1536/2432

    def report(name):
        return json.loads(ok(run_cli("inspect", folder / name, "--json")).stdout)

    bare, single, diffusers = report("native.safetensors"), report("single.safetensors"), report("transformer.safetensors")
    assert (bare["layout"], bare["family"], bare["variant"]) == ("sd3-native", "SD3", variant)
    assert bare["components"] == {"transformer": "sd3-native"}
    assert (single["layout"], single["family"], single["variant"]) == ("sd3-native", "SD3", variant)
    assert single["components"] == {"transformer": "sd3-native", "text_encoder": "hf-clip",
                                    "text_encoder_2": "hf-clip", "text_encoder_3": "transformers"}
    assert (diffusers["layout"], diffusers["family"], diffusers["variant"]) == ("sd3-diffusers", "SD3", variant)


def test_variant_from_real_shapes():
    from loratool.layouts.sd3 import variant

    assert variant({"context_embedder.weight": (1536, 4096), "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}) \
        == "SD3 Medium"
    assert variant({"context_embedder.weight": (2432, 4096), "joint_blocks.0.x_block.attn.ln_q.weight": (64,)}) \
        == "SD3.5 Large"
    assert variant({"context_embedder.weight": (1536, 4096), "transformer_blocks.0.attn2.to_q.weight": (1536, 1536),
                    "transformer_blocks.0.attn.norm_q.weight": (64,)}) == "SD3.5 Medium"


def kohya_lora(modules: dict[str, tuple[int, int]], seed: int, rank: int = 2, alpha: float = 3.0,
               prefix: str = "lora_unet_", dotted: bool = False):
    """kohya/ComfyUI tensors: native module -> (rows, width); and each module's float64 ΔW."""
    generator = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for module, (rows, width) in modules.items():
        name = prefix + (module if dotted else module.replace(".", "_"))
        down = torch.randn(rank, width, generator=generator) * 0.1
        up = torch.randn(rows, rank, generator=generator) * 0.1
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
        deltas[module] = up.double() @ down.double() * float(state[f"{name}.alpha"]) / rank
    return state, deltas


NATIVE_TARGETS = {"joint_blocks.0.x_block.attn.qkv": (3 * H, H), "joint_blocks.0.context_block.attn.qkv": (3 * H, H),
                  "joint_blocks.0.x_block.mlp.fc1": (4 * H, H), "joint_blocks.1.context_block.adaLN_modulation.1": (2 * H, H),
                  "final_layer.adaLN_modulation.1": (2 * H, H), "x_embedder.proj": (H, 16)}


def test_inspect_names_sd3_for_each_lora_dialect(run_cli, tmp_path):
    kohya, _ = kohya_lora(NATIVE_TARGETS, seed=1)
    comfy, _ = kohya_lora(NATIVE_TARGETS, seed=1, prefix="diffusion_model.", dotted=True)
    onetrainer, _ = kohya_lora({"joint_blocks.0.x_block.attn.qkv": (3 * H, H)}, seed=1, prefix="lycoris_")
    generator = torch.Generator().manual_seed(2)
    peft = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, H, generator=generator),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 2, generator=generator)}
    for name, state, metadata in (("kohya", kohya, {"ss_base_model_version": "sd3"}), ("kohya-bare", kohya, None),
                                  ("comfy", comfy, None), ("lycoris", onetrainer, None),
                                  ("diffusers", peft, {"modelspec.architecture": "stable-diffusion-v3.5-large/lora"})):
        save_file(state, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        report = json.loads(ok(run_cli("inspect", tmp_path / f"{name}.safetensors", "--json")).stdout)
        assert report["family"] == "SD3", (name, report["family"])
        assert report["family_from"] == ("metadata" if metadata else "names"), name
    # diffusers names alone (transformer_blocks.N.attn.to_q) are Flux's double blocks and Qwen-Image's
    # too: no family is claimed from them
    save_file(peft, str(tmp_path / "plain.safetensors"))
    assert json.loads(ok(run_cli("inspect", tmp_path / "plain.safetensors", "--json")).stdout)["family"] is None


# --- 3. merges ------------------------------------------------------------------------------------------


def rows_of(delta: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(delta.chunk(parts, dim=0))


def test_kohya_fused_lora_splits_into_diffusers_names(run_cli, tmp_path, sd3_files):
    """Native-named kohya modules (fused qkv, the last block's swapped continuous norm, final layer,
    patch embedding conv) merge into the diffusers-named file's split modules; the same LoRA merged
    into the native file and run through diffusers' converter gives the same tensors."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    kind, state, folder = sd3_files
    targets = dict(NATIVE_TARGETS)
    if kind == "sd3.5m":
        targets["joint_blocks.0.x_block.attn2.qkv"] = (3 * H, H)
    lora, deltas = kohya_lora({k: v for k, v in targets.items() if k != "x_embedder.proj"}, seed=3)
    conv, conv_delta = kohya_lora({"x_embedder.proj": (H, 16)}, seed=4)
    lora.update(conv)  # a LoCon on the patch-embedding conv: down (r, 4·2·2) -> (r, 4, 2, 2)
    lora["lora_unet_x_embedder_proj.lora_down.weight"] = lora["lora_unet_x_embedder_proj.lora_down.weight"].reshape(2, 4, 2, 2)
    lora["lora_unet_x_embedder_proj.lora_up.weight"] = lora["lora_unet_x_embedder_proj.lora_up.weight"].reshape(H, 2, 1, 1)
    save_file(lora, str(tmp_path / "kohya.safetensors"))
    ok(run_cli("merge", folder / "transformer.safetensors", tmp_path / "kohya.safetensors", "-o", tmp_path / "d.safetensors"))
    merged = load_file(str(tmp_path / "d.safetensors"))

    expected = {k: v.double().clone() for k, v in state.items()}
    for native, delta in deltas.items():
        block = native.split(".")[1] if native.startswith("joint_blocks") else None
        if native.endswith("x_block.attn.qkv"):
            parts = [f"transformer_blocks.{block}.attn.to_{p}" for p in "qkv"]
        elif native.endswith("context_block.attn.qkv"):
            parts = [f"transformer_blocks.{block}.attn.add_{p}_proj" for p in "qkv"]
        elif native.endswith("attn2.qkv"):
            parts = [f"transformer_blocks.{block}.attn2.to_{p}" for p in "qkv"]
        else:
            parts = [{"joint_blocks.0.x_block.mlp.fc1": "transformer_blocks.0.ff.net.0.proj",
                      "joint_blocks.1.context_block.adaLN_modulation.1": "transformer_blocks.1.norm1_context.linear",
                      "final_layer.adaLN_modulation.1": "norm_out.linear"}[native]]
            if "adaLN" in native:  # (shift, scale) natively, (scale, shift) in diffusers
                delta = halves_swapped(delta)
        for part, rows in zip(parts, rows_of(delta, len(parts))):
            expected[f"{part}.weight"] += rows
    expected["pos_embed.proj.weight"] += conv_delta["x_embedder.proj"].reshape(H, 4, 2, 2)
    for key in state:
        assert rel(merged[key], expected[key]) < 1e-6, key

    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "kohya.safetensors", "-o", tmp_path / "n.safetensors"))
    converted = convert_sd3_transformer_checkpoint_to_diffusers(load_file(str(tmp_path / "n.safetensors")))
    assert all(rel(converted[k], merged[k]) < 1e-6 for k in state)


def test_diffusers_sd3_loader_drops_what_loratool_merges(sd3_files):
    """diffusers' SD3 LoRA path converts nothing: a kohya/musubi or ComfyUI file in native names loads no
    module at all (a warning that calls it safe to ignore). loratool merges both (tests above)."""
    from diffusers import StableDiffusion3Pipeline

    kind, _, _ = sd3_files
    for prefix, dotted in (("lora_unet_", False), ("diffusion_model.", True)):
        lora, _ = kohya_lora({"joint_blocks.0.x_block.attn.qkv": (3 * H, H)}, seed=1, prefix=prefix, dotted=dotted)
        model = tiny_sd3(kind)
        model.load_lora_adapter(StableDiffusion3Pipeline.lora_state_dict(lora), prefix="transformer")
        assert not any("lora_" in k for k in model.state_dict())


def peft_lora(kind: str, targets: list[str], rank: int = 2, alpha: float = 4.0, seed: int = 7):
    """A LoRA on a tiny SD3 transformer through PEFT itself: (the PEFT-wrapped model, its LoRA state dict
    in diffusers names, the LoraConfig)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = tiny_sd3(kind)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, model)
    return model, get_peft_model_state_dict(model), config


def peft_merged(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


TRANSFORMER_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj",
                       "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.norm1_context.linear",
                       "transformer_blocks.0.ff_context.net.2", "norm_out.linear", "proj_out"]


def test_diffusers_lora_merges_into_the_single_file_as_peft_fuses(run_cli, tmp_path, sd3_files):
    """The issue's case: a LoRA saved by diffusers' `save_lora_weights` (transformer and both CLIPs, alpha
    in `lora_adapter_metadata`), merged into the SD3.5 single file (`model.diffusion_model.` + text
    encoders): q lands in the fused qkv rows, and the result, read by diffusers' converter, is what
    PEFT's own merge gives on the diffusers model; also loaded through diffusers' SD3 LoRA path."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    kind, state, folder = sd3_files
    targets = TRANSFORMER_TARGETS + (["transformer_blocks.0.attn2.to_k"] if kind == "sd3.5m" else [])
    model, transformer_layers, config = peft_lora(kind, targets)
    models, _ = text_encoders()
    te_layers, te_configs = {}, {}
    for name, modules in (("text_encoder", ["text_model.encoder.layers.0.self_attn.q_proj"]),
                          ("text_encoder_2", ["text_model.encoder.layers.1.mlp.fc1", "text_projection"])):
        te_configs[name] = LoraConfig(r=2, lora_alpha=4.0, target_modules=modules, init_lora_weights=False)
        models[name] = inject_adapter_in_model(te_configs[name], models[name])
        te_layers[name] = get_peft_model_state_dict(models[name])
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=transformer_layers, text_encoder_lora_layers=te_layers["text_encoder"],
        text_encoder_2_lora_layers=te_layers["text_encoder_2"], transformer_lora_adapter_metadata=config.to_dict(),
        text_encoder_lora_adapter_metadata=te_configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=te_configs["text_encoder_2"].to_dict())
    lora_path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    saved = load_file(str(lora_path))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in saved

    ok(run_cli("merge", folder / "single.safetensors", lora_path, "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    oracle = peft_merged(model)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in merged.items() if k.startswith(LDM)})
    for key in state:
        assert rel(converted[key], oracle[key]) < 1e-6, key
    changed = [k for k in state if not torch.equal(oracle[k], state[k])]
    assert len(changed) == len(targets)

    # float64 W + alpha/r·B@A on one fused module: q is the first third of x_block.attn.qkv
    a, b = (saved[f"transformer.transformer_blocks.0.attn.to_q.lora_{x}.weight"].double() for x in "AB")
    qkv = merged[f"{LDM}joint_blocks.0.x_block.attn.qkv.weight"]
    assert rel(qkv[:H], state["transformer_blocks.0.attn.to_q.weight"].double() + 2.0 * b @ a) < 1e-6
    assert torch.equal(qkv[H:], torch.cat([state["transformer_blocks.0.attn.to_k.weight"],
                                           state["transformer_blocks.0.attn.to_v.weight"]]))

    # the text encoders, against PEFT's merge of the same layers
    for name in ("text_encoder", "text_encoder_2"):
        reference = peft_merged(models[name])
        for key, tensor in reference.items():
            if "position_ids" in key or (name == "text_encoder" and key == "text_projection.weight"):
                continue
            stored = key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"
            assert rel(merged[TE[name] + stored], tensor) < 1e-6, (name, key)
    assert sum(not torch.equal(merged[k], v) for k, v in text_encoders()[1].items()) == 3

    # diffusers' own SD3 loading path (it reads diffusers names only) on a fresh model, fused
    fresh = tiny_sd3(kind)
    assert isinstance(fresh, SD3Transformer2DModel)
    lora_state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
    fresh.load_lora_adapter(lora_state, prefix="transformer", metadata=metadata)
    reference = peft_merged(fresh)
    assert all(rel(converted[k], reference[k]) < 1e-6 for k in state)


def dialect_lora(dialect: str, seed: int = 30, rank: int = 2):
    """One LoRA on `x_block.attn.qkv`'s k rows (or the whole qkv, natively named) and on CLIP-G's
    k_proj, in one trainer dialect: (file tensors, {native qkv or diffusers module: float64 ΔW})."""
    generator = torch.Generator().manual_seed(seed)
    native = dialect in ("comfyui", "diffusion-pipe", "mochi", "lycoris")
    rows = 3 * H if native else H
    down, up = torch.randn(rank, H, generator=generator), torch.randn(rows, rank, generator=generator)
    te_down, te_up = torch.randn(rank, 12, generator=generator), torch.randn(12, rank, generator=generator)
    module = "joint_blocks.0.x_block.attn.qkv" if native else "transformer_blocks.0.attn.to_k"
    name, te_name, a, b, alpha = {
        "comfyui": ("diffusion_model." + module, "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.k_proj",
                    "lora_down.weight", "lora_up.weight", 1.0),
        "diffusion-pipe": ("diffusion_model." + module, None, "lora_A.weight", "lora_B.weight", None),
        "mochi": ("diffusion_model." + module, None, "lora_A", "lora_B", 4.0),
        "lycoris": ("lycoris_" + module.replace(".", "_"), None, "lora_down.weight", "lora_up.weight", 1.0),
        "ai-toolkit": ("transformer." + module, "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj",
                       "lora_A.weight", "lora_B.weight", None),
        "onetrainer": ("lora_transformer_" + module.replace(".", "_"),
                       "lora_te2_encoder_layers_0_self_attn_k_proj", "lora_down.weight", "lora_up.weight", 1.0),
    }[dialect]
    state = {f"{name}.{a}": down, f"{name}.{b}": up}
    scale = 1.0
    if alpha is not None:
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
        scale = alpha / rank
    deltas = {module: up.double() @ down.double() * scale}
    if te_name:
        state[f"{te_name}.{a}"], state[f"{te_name}.{b}"] = te_down, te_up
        if alpha is not None:
            state[f"{te_name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
        deltas["clip_g.k_proj"] = te_up.double() @ te_down.double() * scale
    return state, deltas


@pytest.mark.parametrize("dialect", ["comfyui", "diffusion-pipe", "mochi", "lycoris", "ai-toolkit", "onetrainer"])
def test_every_dialect_merges_into_the_single_file(run_cli, tmp_path, sd3_files, dialect):
    """ComfyUI (dotted, kohya suffixes, text_encoders.clip_g.), diffusion-pipe (lora_A/B, no alpha),
    Mochi-style (.lora_B without .weight, bf16 alpha), LyCORIS, ai-toolkit (transformer. + diffusers names,
    text_encoder_2.) and OneTrainer (lora_transformer_ + flattened diffusers names, lora_te2_) into the
    single file: native names into the whole fused qkv, diffusers names into its k rows."""
    _, state, folder = sd3_files
    lora, deltas = dialect_lora(dialect)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder / "single.safetensors", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    expected = torch.cat([state[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]).double()
    if "joint_blocks.0.x_block.attn.qkv" in deltas:
        expected += deltas["joint_blocks.0.x_block.attn.qkv"]
    else:
        expected[H:2 * H] += deltas["transformer_blocks.0.attn.to_k"]
    assert rel(merged[f"{LDM}joint_blocks.0.x_block.attn.qkv.weight"], expected) < 1e-6
    key = TE["text_encoder_2"] + "text_model.encoder.layers.0.self_attn.k_proj.weight"
    _, single = text_encoders()
    want = single[key].double() + deltas.get("clip_g.k_proj", 0)
    assert rel(merged[key], want) < 1e-6


@pytest.mark.parametrize("names", ["diffusers", "native"])
def test_simpletuner_lycoris_loha_merges_across_namings(run_cli, tmp_path, sd3_files, names):
    """SimpleTuner's LyCORIS LoHa (`lycoris_` + flattened diffusers names) into the native single file's
    q rows, and a LoHa on the native fused qkv into the diffusers file's q/k/v (ΔW split by rows)."""
    _, state, folder = sd3_files
    generator = torch.Generator().manual_seed(40)
    rows = H if names == "diffusers" else 3 * H
    name = "lycoris_" + ("transformer_blocks_0_attn_to_q" if names == "diffusers" else "joint_blocks_0_x_block_attn_qkv")
    factors = {"hada_w1_a": (rows, 2), "hada_w1_b": (2, H), "hada_w2_a": (rows, 2), "hada_w2_b": (2, H)}
    lora = {f"{name}.{k}": torch.randn(shape, generator=generator) * 0.3 for k, shape in factors.items()}
    lora[f"{name}.alpha"] = torch.tensor(1.0)
    t = {k: lora[f"{name}.{k}"].double() for k in factors}
    delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 0.5
    save_file(lora, str(tmp_path / "loha.safetensors"))
    base = folder / ("single.safetensors" if names == "diffusers" else "transformer.safetensors")
    ok(run_cli("merge", base, tmp_path / "loha.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    if names == "diffusers":
        qkv = merged[f"{LDM}joint_blocks.0.x_block.attn.qkv.weight"]
        assert rel(qkv[:H], state["transformer_blocks.0.attn.to_q.weight"].double() + delta) < 1e-6
    else:
        for i, p in enumerate("qkv"):
            key = f"transformer_blocks.0.attn.to_{p}.weight"
            assert rel(merged[key], state[key].double() + delta[i * H:(i + 1) * H]) < 1e-6, key


def test_text_encoder_loras_merge_into_clip_l_clip_g_and_t5(run_cli, tmp_path, sd3_files):
    """lora_te1_/lora_te2_/lora_te3_ (kohya, transformers 4 CLIP names; T5 as its module names) land in
    the single file's CLIP-L, CLIP-G and T5 tensors, read back by diffusers' single-file converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_sd3_t5_checkpoint_to_diffusers

    _, _, folder = sd3_files
    models, _ = text_encoders()
    targets = {"lora_te1_": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"],
               "lora_te2_": ["text_model.encoder.layers.0.self_attn.k_proj", "text_projection"],
               "lora_te3_": ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi",
                             "encoder.block.0.layer.0.SelfAttention.o"]}
    components = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
    shapes = {}
    for prefix, modules in targets.items():
        reference = models[components[prefix]].state_dict()
        for module in modules:
            shapes[(prefix, module)] = tuple(reference[f"{module}.weight"].shape)
    lora, deltas = {}, {}
    for i, ((prefix, module), (rows, width)) in enumerate(shapes.items()):
        part, delta = kohya_lora({module: (rows, width)}, seed=20 + i, prefix=prefix)
        lora.update(part)
        deltas[(prefix, module)] = delta[module]
    save_file(lora, str(tmp_path / "te.safetensors"))
    ok(run_cli("merge", folder / "single.safetensors", tmp_path / "te.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    read = {"text_encoder": convert_ldm_clip_checkpoint(merged, TE["text_encoder"]),
            "text_encoder_2": convert_ldm_clip_checkpoint(merged, TE["text_encoder_2"]),
            "text_encoder_3": convert_sd3_t5_checkpoint_to_diffusers(merged)}
    for (prefix, module), delta in deltas.items():
        component = components[prefix]
        key = f"{module}.weight"
        expected = models[component].state_dict()[key].double() + delta
        assert rel(read[component][key], expected) < 1e-6, (prefix, module)
    untouched = "text_model.encoder.layers.1.self_attn.q_proj.weight"
    assert torch.equal(read["text_encoder_2"][untouched], models["text_encoder_2"].state_dict()[untouched])


def test_pipeline_folder(run_cli, tmp_path):
    """A StableDiffusion3Pipeline folder (transformer/, text_encoder{,_2,_3}/): a kohya file with native
    transformer names and lora_te2_/lora_te3_ modules merges into the right components, the folder's
    layout kept."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from helpers import load_folder

    model, (models, _) = tiny_sd3("sd3.5m"), text_encoders()
    pipeline = tmp_path / "pipeline"
    model.save_pretrained(pipeline / "transformer")
    for name, encoder in models.items():
        encoder.save_pretrained(pipeline / name)
    (pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"]}))
    report = json.loads(ok(run_cli("inspect", pipeline, "--json")).stdout)
    assert (report["layout"], report["family"]) == ("diffusers-pipeline", "SD3")
    lora, deltas = kohya_lora({"joint_blocks.0.x_block.attn2.qkv": (3 * H, H)}, seed=50)
    for prefix, module, shape in (("lora_te2_", "text_model.encoder.layers.1.self_attn.v_proj", (12, 12)),
                                  ("lora_te3_", "encoder.block.1.layer.1.DenseReluDense.wo", (8, 24))):
        part, delta = kohya_lora({module: shape}, seed=51, prefix=prefix)
        lora.update(part)
        deltas[prefix + module] = delta[module]
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", pipeline, tmp_path / "lora.safetensors", "-o", tmp_path / "merged"))
    state = diffusers_state(model)
    transformer = load_folder(tmp_path / "merged" / "transformer")
    native = to_native(transformer)
    expected = torch.cat([state[f"transformer_blocks.0.attn2.to_{p}.weight"] for p in "qkv"]).double()
    assert rel(native["joint_blocks.0.x_block.attn2.qkv.weight"], expected + deltas["joint_blocks.0.x_block.attn2.qkv"]) < 1e-6
    assert all(torch.equal(a, transformer[k]) for k, a in convert_sd3_transformer_checkpoint_to_diffusers(native).items())
    for prefix, name in (("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3")):
        module = next(k.removeprefix(prefix) for k in deltas if k.startswith(prefix))
        merged = load_folder(tmp_path / "merged" / name)[f"{module}.weight"]
        reference = models[name].state_dict()[f"{module}.weight"].double()
        assert rel(merged, reference + deltas[prefix + module]) < 1e-6, name


# --- 4. convert round trips ----------------------------------------------------------------------------


def products(path) -> dict[str, torch.Tensor]:
    """Module -> float64 alpha/r·B@A of a kohya file (`.alpha` tensors) or a diffusers one (alpha in its
    `lora_adapter_metadata`, per module through `alpha_pattern`)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        config = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    state, out = load_file(str(path)), {}
    for key in state:
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight")):
            if key.endswith(a):
                module = key[: -len(a)]
                down, up = state[key].double().flatten(1), state[module + b].double().flatten(1)
                if f"{module}.alpha" in state:
                    alpha = float(state[f"{module}.alpha"])
                else:
                    component, _, inner = module.partition(".")
                    alpha = config[f"{component}.alpha_pattern"].get(inner, config[f"{component}.lora_alpha"])
                out[module] = up @ down * alpha / down.shape[0]
    return out


SWAPPED = ("final_layer.adaLN_modulation.1", "joint_blocks.1.context_block.adaLN_modulation.1")


def round_trip(run_cli, tmp_path, lora, native_base, diffusers_base):
    """kohya native names -> diffusers (against `native_base`) -> kohya (against the diffusers file) ->
    diffusers again: (the kohya file's products, the diffusers file's, the kohya-again file's)."""
    save_file(lora, str(tmp_path / "kohya.safetensors"))
    ok(run_cli("convert", tmp_path / "kohya.safetensors", "--to", "diffusers", "--base", native_base,
               "-o", tmp_path / "diffusers.safetensors"))
    ok(run_cli("convert", tmp_path / "diffusers.safetensors", "--to", "kohya", "--base", diffusers_base,
               "-o", tmp_path / "back.safetensors"))
    ok(run_cli("convert", tmp_path / "back.safetensors", "--to", "diffusers", "--base", native_base,
               "-o", tmp_path / "again.safetensors"))
    as_diffusers, again = load_file(str(tmp_path / "diffusers.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == as_diffusers.keys()
    assert all(torch.equal(again[k], v) for k, v in as_diffusers.items())
    return (products(tmp_path / "kohya.safetensors"),
            {k.removeprefix("transformer."): v for k, v in products(tmp_path / "diffusers.safetensors").items()},
            {k.removeprefix("lora_unet_"): v for k, v in products(tmp_path / "back.safetensors").items()})


def test_convert_round_trips_losslessly(run_cli, tmp_path, sd3_files):
    """`convert --to diffusers --base <native file>` splits the fused qkv by B rows, `--to kohya --base
    <diffusers file>` writes flattened diffusers names, and back: every module's update is unchanged, and
    each file merges to the same tensors."""
    kind, state, folder = sd3_files
    targets = {k: v for k, v in NATIVE_TARGETS.items() if k != "x_embedder.proj" and k not in SWAPPED}
    lora, _ = kohya_lora(targets, seed=9)
    original, split, back = round_trip(run_cli, tmp_path, lora, folder / "native.safetensors",
                                       folder / "transformer.safetensors")
    qkv = original["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert [rel(split[f"transformer_blocks.0.attn.to_{p}"], qkv[i * H:(i + 1) * H]) for i, p in enumerate("qkv")] \
        == [0.0, 0.0, 0.0]
    context = original["lora_unet_joint_blocks_0_context_block_attn_qkv"]
    assert rel(split["transformer_blocks.0.attn.add_k_proj"], context[H:2 * H]) == 0.0
    assert rel(split["transformer_blocks.0.ff.net.0.proj"], original["lora_unet_joint_blocks_0_x_block_mlp_fc1"]) == 0.0
    assert len(split) == 7 and all(rel(back[m.replace(".", "_")], d) < 1e-12 for m, d in split.items())
    merged = {}
    for name in ("kohya", "diffusers", "back"):
        ok(run_cli("merge", folder / "transformer.safetensors", tmp_path / f"{name}.safetensors", "-o",
                   tmp_path / f"m-{name}.safetensors"))
        merged[name] = load_file(str(tmp_path / f"m-{name}.safetensors"))
    assert all(rel(merged[name][k], merged["kohya"][k]) < 1e-6 for name in ("diffusers", "back") for k in state)


@pytest.mark.parametrize("base", ["native", "transformer"])
def test_swapped_halves_convert_in_diffusers_order(run_cli, tmp_path, sd3_files, base):
    """The final layer's and the last block's (shift, scale) modulation become diffusers' (scale, shift)
    whichever file the names are resolved against, and come back unchanged."""
    _, state, folder = sd3_files
    lora, _ = kohya_lora({k: NATIVE_TARGETS[k] for k in SWAPPED}, seed=10)
    original, split, back = round_trip(run_cli, tmp_path, lora, folder / f"{base}.safetensors",
                                       folder / "transformer.safetensors")
    assert rel(split["norm_out.linear"], halves_swapped(original["lora_unet_final_layer_adaLN_modulation_1"])) == 0.0
    assert rel(split["transformer_blocks.1.norm1_context.linear"], halves_swapped(
        original["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"])) == 0.0
    assert len(split) == 2 and all(rel(back[m.replace(".", "_")], d) < 1e-12 for m, d in split.items())
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "diffusers.safetensors", "-o", tmp_path / "n.safetensors"))
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "kohya.safetensors", "-o", tmp_path / "k.safetensors"))
    ours, theirs = load_file(str(tmp_path / "n.safetensors")), load_file(str(tmp_path / "k.safetensors"))
    assert all(rel(ours[k], theirs[k]) < 1e-6 for k in theirs)


# --- 5. modules the base lacks ----------------------------------------------------------------------------


def test_modules_the_base_lacks_are_refused_unless_skipped(run_cli, tmp_path, sd3_files):
    """A LoRA with MMDiT-X's attn2 where the base has none (SD3, or an SD3.5 Medium block past its dual
    layers) and the last block's context projection (a full block's, absent under `context_pre_only`):
    refused in one line with the count; --skip-missing merges the rest exactly."""
    kind, state, folder = sd3_files
    targets = {"joint_blocks.0.x_block.attn.qkv": (3 * H, H), "joint_blocks.1.x_block.attn2.qkv": (3 * H, H),
               "joint_blocks.1.context_block.attn.proj": (H, H)}
    lora, deltas = kohya_lora(targets, seed=11)
    save_file(lora, str(tmp_path / "medium.safetensors"))
    out = tmp_path / "m.safetensors"
    line = assert_refused(run_cli("merge", folder / "single.safetensors", tmp_path / "medium.safetensors", "-o", out),
                          out, "2 module(s)", "--skip-missing")
    assert "attn2" in line
    report = json.loads(ok(run_cli("merge", folder / "single.safetensors", tmp_path / "medium.safetensors", "-o", out,
                                   "--skip-missing", "--json")).stdout)
    assert len(report["skipped"]) == 2
    merged = load_file(str(out))
    qkv = f"{LDM}joint_blocks.0.x_block.attn.qkv.weight"
    expected = torch.cat([state[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]).double()
    assert rel(merged[qkv], expected + deltas["joint_blocks.0.x_block.attn.qkv"]) < 1e-6
