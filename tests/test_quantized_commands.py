"""The other commands that read a base read quantized ones too: svd-extract between a GGUF base and a
float fine-tune (FP8: test_quantized_fp8.py), and convert --base against an FP8 file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import lora_deltas, ok, rel

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_svd_extract_between_a_gguf_base_and_a_float_finetune(run_cli, tmp_path):
    """ΔW = fine-tune − the GGUF base as llama.cpp stores it (F16, q/k rows permuted in the file):
    the extraction recovers the adapter's update to the F16 rounding of the base."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    merged = tmp_path / "merged"
    ok(run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", merged, "--dtype", "float32"))
    out = tmp_path / "extracted"
    ok(run_cli("svd-extract", FIXTURES / "gguf-base" / "tiny-llama-f16.gguf", merged, "--rank", "8", "--exact",
               "-o", out))
    extracted = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    expected = lora_deltas(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(FIXTURES / "tiny-llama"),
                                                     str(FIXTURES / "lora-llama")))
    assert expected, "the fixture adapter has modules"
    for module, delta in expected.items():
        key = module if module.startswith("base_model.model.") else "base_model.model." + module
        product = extracted[f"{key}.lora_B.weight"].double() @ extracted[f"{key}.lora_A.weight"].double()
        product *= config["lora_alpha"] / config["r"]
        assert rel(product, delta.double()) < 0.02, module


def test_convert_against_an_fp8_flux_base(run_cli, tmp_path):
    """A kohya Flux LoRA converted to diffusers-named PEFT against a ComfyUI FP8 file: the marker and
    scales are no module names, so the layout is the same Flux as in bf16."""
    from test_quantized_fp8 import FLUX_SHAPES, comfy_scaled

    weights = {f"{m}.weight": torch.randn(s) * 0.05 for m, s in FLUX_SHAPES.items()}
    base = tmp_path / "flux-fp8.safetensors"
    comfy_scaled(weights, base)
    from safetensors.torch import save_file

    save_file({"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(2, 4 * 64),
               "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(64, 2),
               "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(2.0)}, str(tmp_path / "lora.safetensors"))
    ok(run_cli("convert", tmp_path / "lora.safetensors", "--to", "peft", "--base", base, "-o", tmp_path / "peft"))
    names = list(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert any("single_transformer_blocks.0.proj_out.lora_A" in name for name in names), names
