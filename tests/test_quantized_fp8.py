"""Merging into FP8 checkpoints: ComfyUI's scaled FP8 (`scaled_fp8` + `.scale_weight`), its per-layer
`.comfy_quant` form, plain float8, and HF block-scaled folders read back by transformers' own loader.

The accuracy rule for every changed tensor: ‖deq(out) − (deq(base) + ΔW)‖ ≤ 1.05 × the error of
round-to-nearest requantization of the exact sum, computed here in float64 with a fresh amax/448 scale
per block. Unchanged tensors must be byte-identical.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import assert_refused, ok

WIDTH = 64
E4M3_MAX = 448.0
FLUX_SHAPES = {
    "double_blocks.0.img_attn.qkv": (3 * WIDTH, WIDTH),
    "double_blocks.0.img_attn.proj": (WIDTH, WIDTH),
    "single_blocks.0.linear1": (7 * WIDTH, WIDTH),
    "single_blocks.0.linear2": (WIDTH, 4 * WIDTH),
}


def quantize_reference(values: torch.Tensor, block: tuple[int, int] | None):
    """float64 round-to-nearest into e4m3 with a fresh amax/448 scale per block (None: per tensor)."""
    values = values.double()
    if block is None:
        scale = values.abs().max() / E4M3_MAX
        stored = (values / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return stored, scale.float()
    rows, cols = values.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float64)
    padded[:rows, :cols] = values.abs()
    scale = padded.reshape(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3)) / E4M3_MAX
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return (values / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale.float()


def dequantize_reference(stored: torch.Tensor, scale: torch.Tensor | None, block=None) -> torch.Tensor:
    values = stored.double()
    if scale is None:
        return values
    if block is None or scale.numel() == 1:
        return values * scale.double().reshape(())
    rows, cols = values.shape
    return values * scale.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]


def raw_bytes(path, name: str) -> bytes:
    with safe_open(str(path), "pt") as f:
        tensor = f.get_tensor(name)
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def flux_lora(path, seed: int = 1, strength: float = 0.1, modules=("double_blocks.0.img_attn.qkv",
                                                                       "single_blocks.0.linear1")):
    """A kohya/musubi LoRA on native Flux names, and module -> float64 ΔW."""
    generator = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for module in modules:
        out, fan_in = FLUX_SHAPES[module]
        down = torch.randn(4, fan_in, generator=generator) * strength
        up = torch.randn(out, 4, generator=generator) * strength
        name = "lora_unet_" + module.replace(".", "_")
        state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(8.0)})
        deltas[module] = up.double() @ down.double() * 2.0
    save_file(state, str(path))
    return deltas


@pytest.fixture(scope="module")
def flux_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = {f"{m}.weight": torch.randn(s, generator=generator) * 0.05 for m, s in FLUX_SHAPES.items()}
    weights.update({f"{m}.bias": torch.randn(s[0], generator=generator) * 0.01 for m, s in FLUX_SHAPES.items()})
    weights["double_blocks.0.img_attn.norm.key_norm.scale"] = torch.ones(WIDTH)
    return weights


def comfy_scaled(weights: dict[str, torch.Tensor], path, form: str = "scaled_fp8"):
    """`scaled_fp8` (marker + `.scale_weight` + `.scale_input`), `comfy_quant` (JSON + `.weight_scale`),
    or `plain` float8 with no scale; biases and norms bf16, as ComfyUI's files have them."""
    state = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)} if form == "scaled_fp8" else {}
    for name, tensor in weights.items():
        if not (name.endswith(".weight") and tensor.dim() == 2):
            state[name] = tensor.to(torch.bfloat16)
            continue
        stem = name.removesuffix("weight")
        if form == "plain":
            state[name] = tensor.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            continue
        stored, scale = quantize_reference(tensor, None)
        state[name] = stored
        if form == "scaled_fp8":
            state[stem + "scale_weight"] = scale.reshape(())
            state[stem + "scale_input"] = torch.tensor(1.0)
        else:
            state[stem + "weight_scale"] = scale.reshape(())
            state[stem + "input_scale"] = torch.tensor(0.5)
            state[stem + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    save_file(state, str(path))
    return state


def check_accuracy(out_path, base_state, deltas, scale_key: str, block=None):
    """Every changed tensor within 1.05× of round-to-nearest of the exact sum; the rest byte-identical."""
    out = load_file(str(out_path))
    assert set(out) == set(base_state)
    for name, stored in base_state.items():
        module = name.removesuffix(".weight")
        if name.endswith(scale_key) and name.removesuffix("." + scale_key) in deltas:
            continue  # a fresh scale, checked with its weight
        if module not in deltas:
            assert raw_bytes(out_path, name) == stored.reshape(-1).view(torch.uint8).numpy().tobytes(), name
            continue
        scale_name = name.removesuffix("weight") + scale_key
        base = dequantize_reference(stored, base_state[scale_name], block)
        exact = base + deltas[module]
        written = dequantize_reference(out[name], out[scale_name], block)
        ideal_stored, ideal_scale = quantize_reference(exact, block)
        ideal = torch.linalg.vector_norm(dequantize_reference(ideal_stored, ideal_scale, block) - exact)
        assert torch.linalg.vector_norm(written - exact) <= 1.05 * ideal + 1e-12, name
        assert out[name].dtype == stored.dtype and out[scale_name].shape == base_state[scale_name].shape


@pytest.mark.parametrize("form,scale_key", [("scaled_fp8", "scale_weight"), ("comfy_quant", "weight_scale")])
def test_a_comfyui_fp8_flux_file_merges_in_its_own_encoding(run_cli, tmp_path, flux_weights, form, scale_key):
    """The new user's first try: a ComfyUI FP8 Flux file exited 1 with an IndexError on the marker."""
    base = tmp_path / "flux1-dev-fp8.safetensors"
    base_state = comfy_scaled(flux_weights, base, form)
    deltas = flux_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "merged.safetensors"
    result = ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out, "--json"))
    check_accuracy(out, base_state, deltas, scale_key)
    report = json.loads(result.stdout)
    assert sorted(f["name"] for f in report["rounding"]) == sorted(f"{m}.weight" for m in deltas)
    for figure in report["rounding"]:
        assert 0 <= figure["error"] < 0.5 and figure["survived"] > 0.5 and figure["aligned"] > 0.5, figure
    assert any("requantized 2 tensor(s)" in note for note in report["notes"])
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_merged_figures_are_what_rounding_did(run_cli, tmp_path, flux_weights):
    """The report's figures against their definitions, recomputed here from the files."""
    base = tmp_path / "base.safetensors"
    base_state = comfy_scaled(flux_weights, base)
    deltas = flux_lora(tmp_path / "lora.safetensors", modules=("double_blocks.0.img_attn.proj",))
    out = tmp_path / "merged.safetensors"
    figure = json.loads(ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out, "--json")).stdout)["rounding"][0]
    name = "double_blocks.0.img_attn.proj.weight"
    merged = load_file(str(out))
    before = dequantize_reference(base_state[name], base_state[name.replace("weight", "scale_weight")])
    after = dequantize_reference(merged[name], merged[name.replace("weight", "scale_weight")])
    delta = deltas["double_blocks.0.img_attn.proj"]
    norm = torch.linalg.vector_norm(delta)
    assert figure["survived"] == pytest.approx(float(torch.linalg.vector_norm(after - before) / norm), rel=1e-4)
    assert figure["error"] == pytest.approx(float(torch.linalg.vector_norm(after - before - delta) / norm), rel=1e-3)
    assert figure["aligned"] == pytest.approx(float(((after - before) * delta).sum() / norm ** 2), rel=1e-3, abs=1e-6)


def test_a_lora_lost_to_rounding_is_reported_with_the_fix(run_cli, tmp_path, flux_weights):
    base = tmp_path / "base.safetensors"
    comfy_scaled(flux_weights, base)
    flux_lora(tmp_path / "lora.safetensors", strength=0.002)
    result = ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    assert "lost most of the adapter" in result.stderr and "--dtype bfloat16" in result.stderr, result


def test_plain_float8_merges_by_rounding_without_a_scale(run_cli, tmp_path, flux_weights):
    base = tmp_path / "flux1-dev-fp8_e4m3fn.safetensors"
    base_state = comfy_scaled(flux_weights, base, "plain")
    deltas = flux_lora(tmp_path / "lora.safetensors", strength=0.5)
    out = tmp_path / "m.safetensors"
    ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out))
    merged = load_file(str(out))
    assert set(merged) == set(base_state)
    for module, delta in deltas.items():
        exact = base_state[module + ".weight"].double() + delta
        expected = exact.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        assert torch.equal(merged[module + ".weight"].view(torch.uint8), expected.view(torch.uint8)), module


def test_dtype_bfloat16_writes_a_plain_dequantized_merge(run_cli, tmp_path, flux_weights):
    base = tmp_path / "base.safetensors"
    base_state = comfy_scaled(flux_weights, base)
    deltas = flux_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "m.safetensors"
    result = ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out, "--dtype", "bfloat16", "--json"))
    merged = load_file(str(out))
    assert set(merged) == {n for n in flux_weights}, "scales and the marker go with the encoding"
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    for name in flux_weights:
        if name.endswith(".weight") and flux_weights[name].dim() == 2:
            base_value = dequantize_reference(base_state[name], base_state[name.replace("weight", "scale_weight")])
            expected = base_value + deltas.get(name.removesuffix(".weight"), 0)
            # rounded once: within half a bf16 step of the exact sum (float32 arithmetic on the way)
            step = torch.finfo(torch.bfloat16).eps * expected.abs()
            assert ((merged[name].double() - expected).abs() <= 0.5 * step + 1e-7).all(), name
    assert json.loads(result.stdout)["rounding"] == []


def test_dtype_float8_quantizes_a_bf16_base_into_comfyui_form_in_one_pass(run_cli, tmp_path, flux_weights):
    base = tmp_path / "base.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in flux_weights.items()}, str(base))
    deltas = flux_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "m.safetensors"
    report = json.loads(ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out, "--dtype",
                                   "float8_e4m3fn", "--json")).stdout)
    merged = load_file(str(out))
    assert merged["scaled_fp8"].dtype == torch.float8_e4m3fn and merged["scaled_fp8"].numel() == 0
    for figure in report["rounding"]:  # survival against the base quantized alone, Q(W), not against W
        name = figure["name"]
        plain = flux_weights[name].to(torch.bfloat16).double()
        alone = dequantize_reference(*quantize_reference(plain, None))
        written = dequantize_reference(merged[name], merged[name.replace("weight", "scale_weight")])
        delta = deltas[name.removesuffix(".weight")]
        expected = float(torch.linalg.vector_norm(written - alone) / torch.linalg.vector_norm(delta))
        assert figure["survived"] == pytest.approx(expected, rel=1e-3), name
    for name, tensor in flux_weights.items():
        if name.endswith(".weight") and tensor.dim() == 2:
            exact = tensor.to(torch.bfloat16).double() + deltas.get(name.removesuffix(".weight"), 0)
            stored, scale = quantize_reference(exact, None)
            assert merged[name].dtype == torch.float8_e4m3fn and merged[name.replace("weight", "scale_weight")].shape == ()
            written = dequantize_reference(merged[name], merged[name.replace("weight", "scale_weight")])
            ideal = torch.linalg.vector_norm(dequantize_reference(stored, scale) - exact)
            assert torch.linalg.vector_norm(written - exact) <= 1.05 * ideal, name
        else:
            assert torch.equal(merged[name], tensor.to(torch.bfloat16)), name
    # and it reads back as the same encoding loratool merges into
    again = ok(run_cli("inspect", out, "--json"))
    assert "FP8 e4m3 per-tensor scaled" in again.stdout


def tiny_llama_fp8_folder(folder, config_block: bool = True, intermediate: int = 384):
    """A tiny llama, block-scaled as DeepSeek-V3 / Qwen3-FP8 checkpoints are (128×128 blocks; an
    intermediate size that is not a multiple of 128 leaves ragged edge blocks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".layers." in name and name.endswith(".weight") and tensor.dim() == 2:
            stored, scale = quantize_reference(tensor, (128, 128))
            state[name], state[name + "_scale_inv"] = stored, scale
        else:
            state[name] = tensor.to(torch.bfloat16)
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = "bfloat16"
    if config_block:
        config_dict["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config_dict))
    return model, state


def peft_adapter(model, folder, seed: int = 3):
    from peft import LoraConfig

    from helpers import make_adapter

    make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]), folder, seed=seed)
    from helpers import lora_deltas
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folder))
    return {name.removeprefix("base_model.model."): d for name, d in lora_deltas(peft_model).items()}


@pytest.mark.slow
def test_a_block_scaled_fp8_folder_merges_and_loads_in_transformers(run_cli, tmp_path):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model, state = tiny_llama_fp8_folder(tmp_path / "base")
    deltas = peft_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    ok(run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", out))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    check_accuracy(out / "model.safetensors", state, deltas, "weight_scale_inv", block=(128, 128))
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                  device_map="cpu")
    merged = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = dequantize_reference(merged[name], merged[name + "_scale_inv"], (128, 128))
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight.detach(), expected.to(torch.bfloat16))
    # dequantized: the quantization_config goes with the encoding, and plain transformers loads it
    plain = tmp_path / "plain"
    ok(run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", plain, "--dtype", "bfloat16"))
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(plain, device_map="cpu")
    exact = dequantize_reference(state[name], state[name + "_scale_inv"], (128, 128)) + deltas[name.removesuffix(".weight")]
    reloaded_weight = reloaded.model.layers[0].self_attn.q_proj.weight.detach().double()
    assert ((reloaded_weight - exact).abs() <= 0.5 * torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-7).all()


def test_ragged_edge_blocks_merge_against_float64_math(run_cli, tmp_path):
    """transformers' dequantizer (5.x) refuses a weight whose shape the grid does not divide, though
    DeepSeek's reference `weight_dequant` and vLLM handle ragged edges; loratool does, checked in float64."""
    model, state = tiny_llama_fp8_folder(tmp_path / "base", intermediate=320)
    deltas = peft_adapter(model, tmp_path / "adapter")
    ok(run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged"))
    check_accuracy(tmp_path / "merged" / "model.safetensors", state, deltas, "weight_scale_inv", block=(128, 128))


def test_fused_expert_tensors_read_per_expert_and_copy_untouched(run_cli, tmp_path):
    """A transformers-v5 style fused MoE tensor (experts, out, in) with one 128×128 grid per expert."""
    model, state = tiny_llama_fp8_folder(tmp_path / "base")
    generator = torch.Generator().manual_seed(7)
    experts = torch.randn(3, 200, 256, generator=generator)
    quantized = [quantize_reference(e, (128, 128)) for e in experts]
    state["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack([q for q, _ in quantized])
    state["model.layers.0.mlp.experts.gate_up_proj_scale_inv"] = torch.stack([s for _, s in quantized])
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    from loratool.checkpoint import open_checkpoint

    with open_checkpoint(tmp_path / "base") as checkpoint:
        info = checkpoint["model.layers.0.mlp.experts.gate_up_proj"]
        assert info.encoding.describe() == "FP8 e4m3 block 128×128" and "gate_up_proj_scale_inv" not in str(list(checkpoint))
        read = checkpoint.read("model.layers.0.mlp.experts.gate_up_proj")
    for index, (stored, scale) in enumerate(quantized):
        # a float32 product is the exact product rounded once, so it equals float64's rounded to float32
        assert torch.equal(read[index], dequantize_reference(stored, scale, (128, 128)).float()), index
    deltas = peft_adapter(model, tmp_path / "adapter")
    ok(run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged"))
    check_accuracy(tmp_path / "merged" / "model.safetensors", state, deltas, "weight_scale_inv", block=(128, 128))


def test_svd_extract_takes_an_fp8_base_and_a_bf16_finetune(run_cli, tmp_path, flux_weights):
    base = tmp_path / "base.safetensors"
    base_state = comfy_scaled(flux_weights, base)
    generator = torch.Generator().manual_seed(5)
    tuned, deltas = {}, {}
    for name, tensor in flux_weights.items():
        value = tensor
        if name.endswith(".weight") and tensor.dim() == 2:
            value = dequantize_reference(base_state[name], base_state[name.replace("weight", "scale_weight")]).float()
            deltas[name] = torch.randn(tensor.shape[0], 2, generator=generator) @ torch.randn(2, tensor.shape[1],
                                                                                              generator=generator) * 0.01
            value = value + deltas[name]
        tuned[name] = value.float()
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "extracted"
    ok(run_cli("svd-extract", base, tmp_path / "tuned.safetensors", "--rank", "2", "-o", out, "--exact"))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    for name, delta in deltas.items():
        module = "base_model.model." + name.removesuffix(".weight")
        product = adapter[module + ".lora_B.weight"].double() @ adapter[module + ".lora_A.weight"].double()
        assert torch.allclose(product, delta.double(), atol=2e-5), name


def test_inspect_names_each_encoding(run_cli, tmp_path, flux_weights):
    base = tmp_path / "base.safetensors"
    comfy_scaled(flux_weights, base)
    report = json.loads(ok(run_cli("inspect", base, "--json")).stdout)
    assert report["dtypes"]["FP8 e4m3 per-tensor scaled"]["tensors"] == 4
    assert report["quantization"]["forms"] == {"comfy-scaled": 4} and report["quantization"]["markers"] == ["scaled_fp8"]
    model, _ = tiny_llama_fp8_folder(tmp_path / "block")
    assert "FP8 e4m3 block 128×128" in ok(run_cli("inspect", tmp_path / "block")).stdout


def test_inspect_check_finds_a_nan_scale(run_cli, tmp_path, flux_weights):
    base = tmp_path / "base.safetensors"
    state = comfy_scaled(flux_weights, base)
    state["single_blocks.0.linear1.scale_weight"] = torch.tensor(float("nan"))
    save_file(state, str(base))
    result = run_cli("inspect", base, "--check")
    assert result.code == 2 and "single_blocks.0.linear1" in result.stderr + result.stdout, result


@pytest.mark.parametrize("breakage,needle", [
    ("missing_scale_inv", "weight_scale_inv is missing"),
    ("grid", "needs [2, 2]"),
    ("marker_without_scales", "no tensor has a scale_weight"),
    ("orphan_scale", "no float8 weight"),
    ("int_scale", "a scale must be a float"),
])
def test_broken_fp8_files_are_refused_in_one_line(run_cli, tmp_path, flux_weights, breakage, needle):
    if breakage in ("missing_scale_inv", "grid"):
        tiny_llama_fp8_folder(tmp_path / "base")
        base = tmp_path / "base"
        state = load_file(str(base / "model.safetensors"))
        if breakage == "missing_scale_inv":
            del state["model.layers.0.self_attn.o_proj.weight_scale_inv"]
        else:
            state["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(3, 2)
        save_file(state, str(base / "model.safetensors"))
        out = tmp_path / "merged"
    else:
        base = tmp_path / "base.safetensors"
        state = comfy_scaled(flux_weights, base, "scaled_fp8")
        if breakage == "marker_without_scales":
            state = {k: v for k, v in state.items() if not k.endswith(("scale_weight", "scale_input"))}
        elif breakage == "orphan_scale":
            state["double_blocks.0.img_attn.norm.key_norm.scale_weight"] = torch.tensor(1.0)
        else:
            state["single_blocks.0.linear1.scale_weight"] = torch.tensor(1, dtype=torch.int32)
        save_file(state, str(base))
        out = tmp_path / "merged.safetensors"
    flux_lora(tmp_path / "lora.safetensors")
    assert_refused(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out), out, needle)
    assert_refused(run_cli("inspect", base), None, needle)


def test_file_metadata_is_kept_and_quantization_metadata_goes_with_the_encoding(run_cli, tmp_path, flux_weights):
    base = tmp_path / "base.safetensors"
    state = comfy_scaled(flux_weights, base, "comfy_quant")
    layers = {"format_version": "1.0", "layers": {"single_blocks.0.linear1": {"format": "float8_e4m3fn"}}}
    metadata = {"modelspec.title": "tiny", "_quantization_metadata": json.dumps(layers)}
    save_file(state, str(base), metadata=metadata)
    flux_lora(tmp_path / "lora.safetensors")
    for dtype, expected in (("auto", metadata), ("bfloat16", {"modelspec.title": "tiny"})):
        out = tmp_path / f"{dtype}.safetensors"
        ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out, "--dtype", dtype))
        with safe_open(str(out), "pt") as f:
            assert f.metadata() == expected, dtype


def test_dtype_float8_in_a_full_checkpoint_quantizes_the_diffusion_model_only(run_cli, tmp_path, flux_weights):
    """ComfyUI's full checkpoints: the marker under `model.diffusion_model.`, text encoders untouched."""
    prefix = "model.diffusion_model."
    state = {prefix + k: v.to(torch.bfloat16) for k, v in flux_weights.items()}
    state["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.randn(64, 32)
    base = tmp_path / "full.safetensors"
    save_file(state, str(base))
    flux_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "m.safetensors"
    ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out, "--dtype", "float8_e4m3fn"))
    merged = load_file(str(out))
    assert merged[prefix + "scaled_fp8"].dtype == torch.float8_e4m3fn and "scaled_fp8" not in merged
    assert merged[prefix + "single_blocks.0.linear2.weight"].dtype == torch.float8_e4m3fn
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(merged[clip], state[clip])


def test_a_nan_code_in_a_float8_base_is_never_read_as_a_number(run_cli, tmp_path, flux_weights):
    """e4m3fn's NaN (S.1111.111) has no float16 twin on the fast widening path: it must stay NaN."""
    base = tmp_path / "base.safetensors"
    state = comfy_scaled(flux_weights, base)
    name = "single_blocks.0.linear1.weight"
    codes = state[name].view(torch.uint8).clone()
    codes[3, 5] = 0xFF
    state[name] = codes.view(torch.float8_e4m3fn)
    save_file(state, str(base))
    flux_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out), out, "NaN")
    checked = json.loads(run_cli("inspect", base, "--check", "--json").stdout)
    assert checked["nonfinite"][name] == {"nan": 1, "inf": 0}


def test_comfyui_formats_it_cannot_requantize_are_kept_as_stored(run_cli, tmp_path, flux_weights):
    """An nvfp4 layer (two values per byte, float8 block scales): copied byte for byte, its scales never
    taken for weights, a merge into it or a dequantized output refused in one line."""
    base = tmp_path / "mixed.safetensors"
    state = {k: v.to(torch.bfloat16) for k, v in flux_weights.items()}
    stem = "double_blocks.0.img_attn.proj."
    state[stem + "weight"] = torch.randint(0, 255, (WIDTH, WIDTH // 2), dtype=torch.uint8)
    state[stem + "weight_scale"] = torch.ones(WIDTH, WIDTH // 16).to(torch.float8_e4m3fn)
    state[stem + "weight_scale_2"] = torch.tensor(0.5)
    state[stem + "comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(state, str(base))
    report = json.loads(ok(run_cli("inspect", base, "--json", "--check")).stdout)
    assert report["dtypes"]["nvfp4 (ComfyUI, kept as stored)"]["parameters"] == WIDTH * WIDTH
    deltas = flux_lora(tmp_path / "lora.safetensors")  # qkv and linear1: not the nvfp4 layer
    out = tmp_path / "m.safetensors"
    ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out))
    for name in (stem + "weight", stem + "weight_scale", stem + "weight_scale_2", stem + "comfy_quant"):
        assert raw_bytes(out, name) == state[name].reshape(-1).view(torch.uint8).numpy().tobytes(), name
    assert set(load_file(str(out))) == set(state) and deltas
    flux_lora(tmp_path / "proj.safetensors", modules=("double_blocks.0.img_attn.proj",))
    assert_refused(run_cli("merge", base, tmp_path / "proj.safetensors", "-o", tmp_path / "p.safetensors"),
                   tmp_path / "p.safetensors", "nvfp4", "cannot requantize")
    assert_refused(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", tmp_path / "b.safetensors", "--dtype",
                           "bfloat16"), tmp_path / "b.safetensors", "cannot dequantize")


def test_diffusers_q_k_v_pieces_land_in_their_rows_of_a_fused_fp8_qkv(run_cli, tmp_path, flux_weights):
    """Three diffusers modules update thirds of one float8 tensor under one fresh scale."""
    base = tmp_path / "base.safetensors"
    state = comfy_scaled(flux_weights, base)
    generator = torch.Generator().manual_seed(4)
    lora, pieces = {}, []
    for leaf in ("to_q", "to_k", "to_v"):
        down, up = torch.randn(2, WIDTH, generator=generator) * 0.2, torch.randn(WIDTH, 2, generator=generator) * 0.2
        lora[f"transformer.transformer_blocks.0.attn.{leaf}.lora_A.weight"] = down
        lora[f"transformer.transformer_blocks.0.attn.{leaf}.lora_B.weight"] = up
        pieces.append(up.double() @ down.double())
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "m.safetensors"
    ok(run_cli("merge", base, tmp_path / "lora.safetensors", "-o", out))
    check_accuracy(out, state, {"double_blocks.0.img_attn.qkv": torch.cat(pieces)}, "scale_weight")


def test_a_broken_comfy_quant_entry_is_named_once(run_cli, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "a.weight_scale": torch.tensor(1.0),
               "a.comfy_quant": torch.tensor(list(b"nope"), dtype=torch.uint8)}, str(base))
    line = assert_refused(run_cli("inspect", base), None, "a.comfy_quant does not hold JSON")
    assert line.count("does not hold JSON") == 1, line
