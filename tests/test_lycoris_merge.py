"""merge folds LyCORIS files (LoHa, LoKr, LoCon with Tucker, full and norm diffs, DoRA on both axes)
written by LyCORIS' own kohya network into a pipeline folder and into an LDM single file: every
adapted layer of the merged model computes what LyCORIS' forward computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lycoris.kohya import LycorisNetworkKohya

from helpers import load_folder
from lycoris_oracle import base_tensors, quiet_lycoris, randomize, sample_input
from test_layouts import LDM, SD1_TE, diffusers_from_ldm, to_ldm_unet
from test_lycoris_networks import PRESET

quiet_lycoris()

NETWORKS = {
    "loha-tucker": dict(network_module="loha", use_tucker=True),
    "lokr-decompose-both": dict(network_module="lokr", decompose_both=True, lora_dim=2, conv_lora_dim=2),
    "lokr-factor": dict(network_module="lokr", factor=4),
    "locon-tucker-dora": dict(network_module="locon", use_tucker=True, weight_decompose=True),
    "loha-dora-in": dict(network_module="loha", weight_decompose=True, wd_on_out=False),
    "full": dict(network_module="full"),
    "lora-train-norm": dict(network_module="lora", train_norm=True),
}


def tiny_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=8, sample_size=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).double().eval()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=50, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1)).double().eval()
    return unet, text


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris-base")
    unet, text = tiny_models()
    unet.save_pretrained(folder / "pipeline" / "unet")
    text.save_pretrained(folder / "pipeline" / "text_encoder")
    (folder / "pipeline" / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    single = to_ldm_unet({k: v for k, v in unet.state_dict().items()})
    single.update({f"{SD1_TE}text_model.{k}": v for k, v in text.state_dict().items() if "position_ids" not in k})
    save_file(single, str(folder / "sd1.safetensors"))
    return folder, dict(unet.config)


@pytest.fixture
def preset():
    saved = {attr: getattr(LycorisNetworkKohya, attr) for attr in
             ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
              "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
              "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")}
    LycorisNetworkKohya.apply_preset(PRESET)
    yield
    for attr, value in saved.items():
        setattr(LycorisNetworkKohya, attr, value)


def lycoris_file(tmp_path, kwargs):
    """LyCORIS' network on fresh models, randomised and saved as its trainer integration saves it.
    Returns the file and the network (still applied, so each module's forward is the oracle)."""
    unet, text = tiny_models()
    kwargs = {"lora_dim": 4, "conv_lora_dim": 4, "alpha": 2.0, "conv_alpha": 1.0, **kwargs}
    net = LycorisNetworkKohya(text, unet, multiplier=1.0, **kwargs)
    net.apply_to(text, unet, True, True)
    net.double()
    randomize(net, 17)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float64, {"ss_network_module": "lycoris.kohya"})
    return path, net


def assert_layers_match(net, merged_unet: dict, merged_text: dict) -> int:
    """Each LyCORIS module's forward equals its layer's op with the merged weight and bias."""
    from loratool.layouts.index import flatten

    unet_names = {"lora_unet_" + flatten(k.rsplit(".", 1)[0]): k.rsplit(".", 1)[0] for k in merged_unet}
    text_names = {"lora_te_" + flatten(k.rsplit(".", 1)[0]): k.rsplit(".", 1)[0] for k in merged_text}
    checked = 0
    for module in net.unet_loras + net.text_encoder_loras:
        state, names = (merged_unet, unet_names) if module.lora_name in unet_names else (merged_text, text_names)
        path = names[module.lora_name]
        weight, bias = state[f"{path}.weight"].double(), state.get(f"{path}.bias")
        x = sample_input(module, 3)
        with torch.no_grad():
            expected = module(x)
            got = module.op(x, weight=weight, bias=None if bias is None else bias.double(), **module.kw_dict)
        scale = float(expected.abs().max())
        assert float((expected - got).abs().max()) <= 1e-5 * max(1.0, scale), module.lora_name
        checked += 1
    return checked


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_lycoris_file_merges_into_a_pipeline(run_cli, tmp_path, pipeline, preset, network):
    folder, _ = pipeline
    path, net = lycoris_file(tmp_path, NETWORKS[network])
    try:
        result = run_cli("merge", folder / "pipeline", path, "-o", tmp_path / "merged")
        assert result.code == 0, result
        checked = assert_layers_match(net, load_folder(tmp_path / "merged" / "unet"),
                                      load_folder(tmp_path / "merged" / "text_encoder"))
        assert checked == len(net.unet_loras) + len(net.text_encoder_loras) > 20
    finally:
        for module in net.unet_loras + net.text_encoder_loras:
            module.restore()


def test_lycoris_file_merges_into_an_ldm_single_file_with_weights(run_cli, tmp_path, pipeline, preset):
    """LoKr into LDM names, at weight 1 and then unmerged with -1 back to the base."""
    folder, config = pipeline
    path, net = lycoris_file(tmp_path, NETWORKS["lokr-factor"])
    try:
        single = folder / "sd1.safetensors"
        assert run_cli("merge", single, path, "-o", tmp_path / "m.safetensors").code == 0
        merged = load_file(str(tmp_path / "m.safetensors"))
        unet = diffusers_from_ldm(tmp_path / "m.safetensors", config)
        text = {k.removeprefix(SD1_TE + "text_model."): v for k, v in merged.items() if k.startswith(SD1_TE)}
        assert assert_layers_match(net, unet, text) > 20
        restored = tmp_path / "restored.safetensors"
        assert run_cli("merge", tmp_path / "m.safetensors", path, "--weights", "-1", "-o", restored).code == 0
        original, back = load_file(str(single)), load_file(str(restored))
        assert max(float((back[k].double() - original[k].double()).abs().max()) for k in original) < 1e-5
        assert any(k.startswith(LDM) and not torch.equal(merged[k], original[k]) for k in original)
    finally:
        for module in net.unet_loras + net.text_encoder_loras:
            module.restore()


def test_lycoris_and_lora_merge_together_with_weights(run_cli, tmp_path, pipeline, preset):
    """A LoHa file at weight 0.5 and a plain kohya LoRA at weight 1 on the same layers: W + 0.5·ΔW_LoHa +
    ΔW_LoRA, with ΔW_LoHa from LyCORIS' own forward (its output minus the base layer's, at multiplier 1)."""
    from loratool.layouts.index import flatten

    folder, _ = pipeline
    path, net = lycoris_file(tmp_path, NETWORKS["loha-tucker"])
    try:
        linear = [m for m in net.unet_loras if m.module_type == "linear"][:3]
        generator = torch.Generator().manual_seed(5)
        lora = {}
        for module in linear:
            layer = module.org_module[0]
            lora[f"{module.lora_name}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=generator)
            lora[f"{module.lora_name}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=generator)
            lora[f"{module.lora_name}.alpha"] = torch.tensor(1.0)
        save_file(lora, str(tmp_path / "lora.safetensors"))
        result = run_cli("merge", folder / "pipeline", path, tmp_path / "lora.safetensors", "--weights", "0.5,1",
                         "-o", tmp_path / "both")
        assert result.code == 0, result
        merged = load_folder(tmp_path / "both" / "unet")
        paths = {"lora_unet_" + flatten(k.rsplit(".", 1)[0]): k.rsplit(".", 1)[0] for k in merged}
        for module in linear:
            weight, _ = base_tensors(module)
            eye = torch.eye(weight.shape[1], dtype=torch.float64)
            with torch.no_grad():
                loha = (module(eye) - module.org_forward(eye)).T  # ΔW as the layer applies it
            name = module.lora_name
            lora_delta = lora[f"{name}.lora_up.weight"].double() @ lora[f"{name}.lora_down.weight"].double() / 2
            expected = weight.double() + 0.5 * loha + lora_delta
            got = merged[f"{paths[name]}.weight"].double()
            assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max()), name
    finally:
        for module in net.unet_loras + net.text_encoder_loras:
            module.restore()
