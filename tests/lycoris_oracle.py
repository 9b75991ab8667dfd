"""Real LyCORIS modules and networks as oracles: build, randomise, and read back what their forward uses."""

from __future__ import annotations

import contextlib
import logging

import torch

from loratool.lora.algorithms import build_module, split_key
from loratool.lora.algorithms import LoraModule


def quiet_lycoris() -> None:
    from lycoris.logging import logger

    logger.setLevel(logging.ERROR)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every adapter parameter (LyCORIS initialises to a zero update); a dora_scale
    stays near the base norms so the rescaling is a real but moderate one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
            if "dora_scale" in name:
                param.mul_(1 + 0.2 * noise)
            elif name in ("weight", "bias"):  # FullModule: after apply_to these are the absolute weights
                param.add_(0.3 * noise)
            else:
                param.copy_(0.5 * noise)


def lycoris_parts(module) -> dict[str, torch.Tensor]:
    """Role -> tensor as the module saves it (its `custom_state_dict`, the keys a file holds)."""
    return {role: t.detach().clone() for role, t in module.state_dict().items()}


def sample_input(module, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    layer = module.org_module[0]
    kind = module.module_type
    if kind == "linear":
        shape = (2 * layer.in_features + 3, layer.in_features)
    elif kind == "conv2d":
        shape = (2, layer.in_channels, 7, 7)
    elif kind == "layernorm":
        shape = (9, *layer.normalized_shape)
    elif kind == "groupnorm":
        shape = (2, layer.num_channels, 3, 3)
    else:
        raise ValueError(kind)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def base_tensors(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's original weight and bias (FullModule keeps its own copies once applied)."""
    if hasattr(module, "_org_weight"):
        return module.org_weight.detach(), None if module.org_bias is None else module.org_bias[0].detach()
    layer = module.org_module[0]
    return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()


def ours_forward(ours, module, x: torch.Tensor) -> torch.Tensor:
    """The layer's op on x with our merged weight (and bias delta) in place of LyCORIS' forward."""
    weight, bias = base_tensors(module)
    merged = ours.apply_to(weight.double()).to(x.dtype)
    bias_delta = ours.bias_delta(torch.float64)
    if bias_delta is not None:
        bias = bias_delta if bias is None else bias.double() + bias_delta
    return module.op(x, weight=merged, bias=bias, **module.kw_dict)


def check_module(module, ours, seed: int = 0) -> float:
    """Max |LyCORIS forward − our merged forward| on a batch that pins down the whole weight, relative
    to the output's size: float64 exact for the LyCORIS classes, float32 for `LoraModule`, whose
    delta is computed in float32 by lora/delta.py."""
    atol = 1e-5 if isinstance(ours, LoraModule) else 1e-10
    x = sample_input(module, seed)
    with torch.no_grad():
        expected = module(x)
        got = ours_forward(ours, module, x)
    assert expected.shape == got.shape
    err = float((expected - got).abs().max())
    scale = float(expected.abs().max())
    assert err <= atol * max(1.0, scale), f"{module.lora_name}: {err} (scale {scale})"
    return err


def modules_from_state_dict(state: dict[str, torch.Tensor]):
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        split = split_key(key)
        assert split is not None, key
        groups.setdefault(split[0], {})[split[1]] = tensor
    return {name: build_module(name, parts) for name, parts in groups.items()}



#: Targets like LyCORIS' "full" preset, minus the names its module list already covers (which it
#: would create twice on a diffusers UNet and then refuse as duplicates).
PRESET = {"enable_conv": True,
          "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
          "unet_target_name": ["conv_in", "conv_out"], "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
          "text_encoder_target_name": [], "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
          "exclude_name": []}
_PRESET_ATTRIBUTES = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                      "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                      "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


@contextlib.contextmanager
def applied_preset():
    """LyCORIS' kohya network with `PRESET`, restored afterwards (the preset is class state)."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = {attr: getattr(LycorisNetworkKohya, attr) for attr in _PRESET_ATTRIBUTES}
    LycorisNetworkKohya.apply_preset(PRESET)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(LycorisNetworkKohya, attr, value)


def tiny_sd_models():
    """A tiny SD UNet and CLIP text encoder in float64, for LyCORIS networks."""
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
