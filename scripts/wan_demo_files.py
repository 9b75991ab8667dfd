"""Write a tiny Wan T2V transformer as a native single file (Wan-AI's names, under
`model.diffusion_model.` as ComfyUI saves it) and a musubi-tuner-style LoRA for it (`lora_unet_` +
flattened native names, bf16 `.alpha`), for the demo. The transformer is a real diffusers
WanTransformer3DModel built from a config, renamed with loratool's Wan table (which
tests/test_family_wan.py checks against diffusers' own single-file converter).

Usage: python scripts/wan_demo_files.py OUT  ->  OUT/tiny-wan.safetensors, OUT/wan-musubi-lora.safetensors
"""

import re
import sys
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from loratool.layouts.wan import FAMILY, PARAMETERS

out = Path(sys.argv[1])
torch.manual_seed(0)
model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4, in_channels=16,
                              out_channels=16, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
native_of = {d: n for n, d in FAMILY.top_level.items()} | {d: n for n, d in PARAMETERS.items()}
for block in FAMILY.blocks:
    native_of |= {f"{block.diffusers}.N.{parts[0]}": f"{block.native}.N.{leaf}" for leaf, parts in block.leaves.items()}
single = {}
for key, tensor in model.state_dict().items():
    number = re.match(r"blocks\.(\d+)\.", key)
    pattern = re.sub(r"^blocks\.\d+\.", "blocks.N.", key)
    module, param = (pattern, "") if pattern in native_of else pattern.rsplit(".", 1)
    name = native_of[module] + (f".{param}" if param else "")
    name = name.replace(".N.", f".{number.group(1)}.") if number else name
    single["model.diffusion_model." + name] = tensor.contiguous()
save_file(single, str(out / "tiny-wan.safetensors"))

generator = torch.Generator().manual_seed(1)
lora, rank = {}, 4
for key, tensor in single.items():
    module = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
    if re.match(r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.", key.removeprefix("model.diffusion_model.")) \
            and key.endswith(".weight") and tensor.ndim == 2:
        name = "lora_unet_" + module.replace(".", "_")
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, tensor.shape[1], generator=generator) * 0.1
        lora[f"{name}.lora_up.weight"] = torch.randn(tensor.shape[0], rank, generator=generator) * 0.1
        lora[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
save_file(lora, str(out / "wan-musubi-lora.safetensors"), metadata={"ss_base_model_version": "wan2.1_t2v_1.3b"})
print(f"wrote {out / 'tiny-wan.safetensors'} ({len(single)} tensors) and {out / 'wan-musubi-lora.safetensors'} "
      f"({len(lora) // 3} modules, rank {rank}, alpha 2)")
