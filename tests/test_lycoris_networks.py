"""LyCORIS' kohya-style networks on a tiny SD UNet and CLIP text encoder: the keys its state_dict
writes parse through our role table and builder, and every module's ΔW matches its forward."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from lycoris.kohya import LycorisNetworkKohya

from loratool.lora.algorithms import split_key
from loratool.lora.algorithms import LoraModule
from lycoris_oracle import (applied_preset, check_module, modules_from_state_dict, quiet_lycoris, randomize,
                            tiny_sd_models)

quiet_lycoris()

@pytest.fixture(scope="module")
def models():
    return tiny_sd_models()


@pytest.fixture
def preset():
    with applied_preset():
        yield


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
