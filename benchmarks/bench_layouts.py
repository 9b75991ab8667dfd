"""Layout detection and name resolution on real diffusion-transformer key sets (issue 20).

Each model is built on the meta device from its published diffusers config (no weights, no network),
its state dict's names and shapes are taken as the diffusers-named base, and the family's table turns
them into the native single file's (fused native tensors are their diffusers parts stacked by rows).
A LoRA covering every linear module is then resolved against each base, in the dialects trainers
write: native names dotted (ComfyUI/diffusion-pipe `diffusion_model.`) and flattened (musubi/kohya
`lora_unet_`) against the native file, and diffusers names (`transformer.`) against the diffusers file.
Timed: `layout_of` (detection and building the resolved view) + `BaseLayout.resolve`, medians of
--repeat runs, in milliseconds.

Add a family: one entry in MODELS (class path, published config, family name).

Usage: python benchmarks/bench_layouts.py [--repeat 5] [--json] [--only NAME]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loratool.layouts import layout_of  # noqa: E402
from loratool.layouts.dit_families import FAMILIES  # noqa: E402

#: name -> (diffusers class, its published transformer/config.json, family name).
MODELS = {
    # Wan-AI/Wan2.1-T2V-14B-Diffusers (the same shapes as each Wan 2.2 T2V-A14B expert)
    "Wan 14B T2V": ("diffusers.WanTransformer3DModel", dict(
        added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06, ffn_dim=13824,
        freq_dim=256, image_dim=None, in_channels=16, num_attention_heads=40, num_layers=40, out_channels=16,
        patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096), "Wan"),
    # Wan-AI/Wan2.1-I2V-14B-720P-Diffusers: CLIP image embedding, k_img/v_img in every block
    "Wan 14B I2V": ("diffusers.WanTransformer3DModel", dict(
        added_kv_proj_dim=5120, attention_head_dim=128, cross_attn_norm=True, eps=1e-06, ffn_dim=13824,
        freq_dim=256, image_dim=1280, in_channels=36, num_attention_heads=40, num_layers=40, out_channels=16,
        patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096), "Wan"),
    # Qwen/Qwen-Image (and Qwen-Image-Edit, the same shapes): 60 dual-stream blocks, 20B
    "Qwen-Image 20B": ("diffusers.QwenImageTransformer2DModel", dict(
        attention_head_dim=128, axes_dims_rope=(16, 56, 56), guidance_embeds=False, in_channels=64,
        joint_attention_dim=3584, num_attention_heads=24, num_layers=60, out_channels=16, patch_size=2), "Qwen-Image"),
    # Qwen-Image 2.1: diffusers' QwenImage21Transformer2DModel defaults (native: gate_up fused, gate rows first)
    "Qwen-Image 2.1": ("diffusers.models.transformers.transformer_qwenimage21.QwenImage21Transformer2DModel", dict(),
                       "Qwen-Image"),
    # Lightricks/LTX-Video (2B, 0.9.x)
    "LTX-Video 2B": ("diffusers.LTXVideoTransformer3DModel", dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
        cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, attention_bias=True,
        attention_out_bias=True), "LTX-Video"),
    # LTX-2: diffusers' LTX2VideoTransformer3DModel defaults (48 audio-video blocks)
    "LTX-2": ("diffusers.models.transformers.transformer_ltx2.LTX2VideoTransformer3DModel", dict(), "LTX-2"),
    # hunyuanvideo-community/HunyuanVideo (13B): 20 double, 40 single, 2 token-refiner blocks; native fused qkv/linear1
    "HunyuanVideo 13B": ("diffusers.HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56)), "HunyuanVideo"),
    # HiDream-ai/HiDream-I1-Full (17B; Dev, Fast and E1 share the shapes): 16 double, 32 single stream blocks,
    # 4 routed experts (llama_layers picks hidden states in forward and changes no shape)
    "HiDream-I1 17B": ("diffusers.HiDreamImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
        num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
        llama_layers=list(range(48))), "HiDream"),
    # stabilityai/stable-diffusion-3.5-large: 38 MMDiT blocks, fused qkv per stream
    "SD3.5 Large": ("diffusers.SD3Transformer2DModel", dict(
        attention_head_dim=64, in_channels=16, joint_attention_dim=4096, out_channels=16, patch_size=2,
        pooled_projection_dim=2048, sample_size=128, caption_projection_dim=2432, num_attention_heads=38,
        num_layers=38, pos_embed_max_size=192, qk_norm="rms_norm"), "SD3"),
}
WEIGHT = ".weight"


def meta_shapes(class_path: str, config: dict) -> dict[str, tuple[int, ...]]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    with torch.device("meta"):
        model = cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def native_shapes(family, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The native file's names and shapes through the family's table: each native module's weight is
    its diffusers parts stacked by rows (biases too); names the table does not cover are kept."""
    modules = {k[: -len(WEIGHT)] for k in shapes if k.endswith(WEIGHT)}
    native, used = {}, set()
    for name, parts in family.diffusers_groups(modules).items():
        weights = [shapes[f"{p}{WEIGHT}"] for p in parts]
        param = "weight" if len(weights[0]) > 1 else family.norm_param
        native[f"{name}.{param}"] = (sum(w[0] for w in weights), *weights[0][1:])
        if all(f"{p}.bias" in shapes for p in parts):
            native[f"{name}.bias"] = (sum(shapes[f"{p}.bias"][0] for p in parts),)
            used |= {f"{p}.bias" for p in parts}
        used |= {f"{p}{WEIGHT}" for p in parts}
    native.update({k: v for k, v in shapes.items() if k not in used})
    return native


def linear_modules(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return sorted(k[: -len(WEIGHT)] for k, s in shapes.items() if k.endswith(WEIGHT) and len(s) == 2)


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bench(name: str, repeat: int) -> dict:
    class_path, config, family_name = MODELS[name]
    family = next(f for f in FAMILIES if f.name == family_name)
    diffusers = meta_shapes(class_path, config)
    native = native_shapes(family, diffusers)
    native_linear, diffusers_linear = linear_modules(native), linear_modules(diffusers)
    cases = {
        "native, diffusion_model. names": (native, [f"diffusion_model.{m}" for m in native_linear], False),
        "native, lora_unet_ names": (native, ["lora_unet_" + m.replace(".", "_") for m in native_linear], True),
        "diffusers, transformer. names": (diffusers, [f"transformer.{m}" for m in diffusers_linear], False),
        "diffusers, musubi native names": (diffusers, ["lora_unet_" + m.replace(".", "_") for m in native_linear],
                                           True),
    }
    result = {"model": name, "tensors": len(diffusers), "lora_modules": len(diffusers_linear), "ms": {}}
    for case, (shapes, names, flat) in cases.items():
        def run():
            layout = layout_of(shapes, Path(name))
            assert layout.family == family_name, (case, layout.family)
            resolved = layout.resolve(names, flat=flat)
            assert len(resolved) == len(names), case
        result["ms"][case] = round(timed(run, repeat), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", action="append", help="a MODELS name (repeatable)")
    args = parser.parse_args()
    results = [bench(name, args.repeat) for name in (args.only or MODELS)]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['model']}: {r['tensors']} tensors, a LoRA on all {r['lora_modules']} linear modules")
        for case, ms in r["ms"].items():
            print(f"  {case:<34} {ms:8.1f} ms  (layout_of + resolve, median of {args.repeat})")


if __name__ == "__main__":
    main()
