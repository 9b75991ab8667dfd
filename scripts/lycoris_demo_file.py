"""Write a tiny diffusers UNet (`OUT/tiny-unet/`) and a LoHa file for it (`OUT/style-loha.safetensors`)
saved by LyCORIS' own kohya network, as sd-scripts' trainer saves one, for the demo. The LoHa factors
are random (LyCORIS starts from a zero update), so the file changes the model.

Usage: python scripts/lycoris_demo_file.py OUT
"""

import logging
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from lycoris.kohya import LycorisNetworkKohya
from lycoris.logging import logger
from transformers import CLIPTextConfig, CLIPTextModel

out = Path(sys.argv[1])
logger.setLevel(logging.ERROR)
torch.manual_seed(0)
unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, cross_attention_dim=8,
                            attention_head_dim=2, norm_num_groups=4,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
text = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=1))
unet.save_pretrained(out / "tiny-unet")
# LyCORIS' attention + resnet targets on the UNet, with its 3×3 convs as Tucker LoHa; no text encoder
LycorisNetworkKohya.apply_preset({"enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
                                  "unet_target_name": [], "text_encoder_target_module": [],
                                  "text_encoder_target_name": []})
net = LycorisNetworkKohya(text, unet, multiplier=1.0, lora_dim=4, alpha=2.0, conv_lora_dim=4, conv_alpha=1.0,
                          network_module="loha", use_tucker=True)
net.apply_to(text, unet, False, True)
generator = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, param in net.named_parameters():
        param.copy_(0.3 * torch.randn(param.shape, generator=generator))
net.save_weights(str(out / "style-loha.safetensors"), torch.float32,
                 {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}'})
