"""LyCORIS' kohya-style networks on a tiny SD UNet and CLIP text encoder: the keys its state_dict
writes parse through our role table and builder, and every module's ΔW matches its forward."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from lycoris.kohya import LycorisNetworkKohya

from loratool.lora.algorithms import split_key
from loratool.lora.module import LoraModule
from lycoris_oracle import check_module, modules_from_state_dict, quiet_lycoris, randomize

quiet_lycoris()

#: Targets like LyCORIS' "full" preset, minus the names its module list already covers (which it
#: would create twice on a diffusers UNet and then refuse as duplicates).
PRESET = {"enable_conv": True,
          "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
          "unet_target_name": ["conv_in", "conv_out"], "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
          "text_encoder_target_name": [], "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
          "exclude_name": []}


@pytest.fixture(scope="module")
def models():
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


NETWORKS = [
    ("loha-tucker", dict(network_module="loha", use_tucker=True), {"loha"}, {"hada_t1", "hada_w1_a"}),
    ("lokr", dict(network_module="lokr", factor=4, lora_dim=4), {"lokr"}, {"lokr_w2_a", "lokr_w2"}),
    ("lokr-decompose-both", dict(network_module="lokr", decompose_both=True, lora_dim=2, conv_lora_dim=2), {"lokr"},
     {"lokr_w1_a", "lokr_w2_b"}),
    ("locon-tucker-dora", dict(network_module="locon", use_tucker=True, weight_decompose=True), {"lora", "locon"},
     {"lora_mid.weight", "dora_scale"}),
    ("loha-dora-in", dict(network_module="loha", weight_decompose=True, wd_on_out=False), {"loha"}, {"dora_scale"}),
    ("full", dict(network_module="full"), {"full"}, {"diff", "diff_b"}),
    ("lora-train-norm", dict(network_module="lora", train_norm=True), {"lora", "locon", "full"}, {"w_norm", "b_norm"}),
]


@pytest.mark.parametrize("network", NETWORKS, ids=[n[0] for n in NETWORKS])
def test_network_state_dict_parses_and_matches_forward(models, preset, network, tmp_path):
    _, kwargs, algorithms, roles = network
    unet, text = models
    kwargs = {"lora_dim": 4, "conv_lora_dim": 4, "alpha": 2.0, "conv_alpha": 1.0, **kwargs}
    net = LycorisNetworkKohya(text, unet, multiplier=1.0, **kwargs)
    net.apply_to(text, unet, True, True)
    try:
        net.double()
        randomize(net, 11)
        net.save_weights(str(tmp_path / "net.safetensors"), torch.float64, {"ss_network_module": "lycoris.kohya"})
        state = load_file(str(tmp_path / "net.safetensors"))  # the file LyCORIS' trainer integration writes
        assert state.keys() == net.state_dict().keys()
        assert roles <= {split_key(key)[1] for key in state}
        ours = modules_from_state_dict(state)
        lycoris_modules = {m.lora_name: m for m in net.unet_loras + net.text_encoder_loras}
        assert set(ours) == set(lycoris_modules)
        # transformers 5's CLIPTextModel has no `text_model.` level, so neither do the kohya names
        assert {"lora_te_encoder_layers_0_self_attn_q_proj", "lora_te_encoder_layers_0_mlp_fc2",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"} <= set(ours)
        assert {m.algorithm for m in ours.values()} == algorithms
        for name, module in lycoris_modules.items():
            weight = module.org_weight
            if not isinstance(ours[name], LoraModule):
                ours[name].fit_to(weight.shape)
            check_module(module, ours[name])
        counts = Counter(type(m).__name__ for m in ours.values())
        assert sum(counts.values()) == len(lycoris_modules) > 20
    finally:
        for module in net.unet_loras + net.text_encoder_loras:
            module.restore()
