"""Write a tiny SD1-style single-file checkpoint (LDM names, as A1111/ComfyUI keep them) and a kohya
LoRA naming its modules in LDM terms, for the demo. The UNet is a real diffusers UNet2DConditionModel
built from a config, renamed with loratool's LDM table (which tests/test_layouts.py checks against
diffusers' own single-file converter)."""

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from loratool.layouts import unet as table

out = Path(sys.argv[1])
torch.manual_seed(0)
unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=2, sample_size=8, cross_attention_dim=8,
                            attention_head_dim=2, norm_num_groups=4,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
text = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    vocab_size=50, max_position_embeddings=16))
state = unet.state_dict()
modules = [k.rsplit(".", 1)[0] for k in state]
per_level, attention = table.diffusers_per_level(modules), table.up_levels_with_attention(modules)
single = {}
for key, tensor in state.items():
    module, param = key.rsplit(".", 1)
    single[f"model.diffusion_model.{table.diffusers_to_ldm(module, per_level, attention.__contains__)}.{param}"] = tensor
single.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()
               if "position_ids" not in k})
save_file({k: v.contiguous() for k, v in single.items()}, str(out / "tiny-sd1.safetensors"))
lora = {}
for name, (fan_out, fan_in) in {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (8, 8),
                                "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v": (8, 8),
                                "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (8, 8)}.items():
    lora[f"{name}.lora_down.weight"] = torch.randn(4, fan_in) * 0.1
    lora[f"{name}.lora_up.weight"] = torch.randn(fan_out, 4) * 0.1
    lora[f"{name}.alpha"] = torch.tensor(2.0)
save_file(lora, str(out / "style-lora.safetensors"), metadata={"ss_base_model_version": "sd_v1",
                                                               "ss_network_module": "networks.lora"})
