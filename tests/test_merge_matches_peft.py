"""`loratool merge` against the real PEFT: load + merge_and_unload is the oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from helpers import (LLAMA_LINEARS, TinyConvNet, load_folder, make_adapter, peft_merged_state, randomize_adapter,
                     tiny_gpt2, tiny_llama, tiny_qwen2)


def max_diff(ours: dict, oracle: dict) -> float:
    assert ours, "merge wrote no tensors"
    return max((ours[k].double() - oracle[k].double()).abs().max().item() for k in ours)


def changed(ours: dict, base: dict) -> int:
    return sum(not torch.equal(ours[k], base[k]) for k in ours)


def merge_cli(run_cli, base, adapters, out, *extra):
    result = run_cli("merge", base, *adapters, "-o", out, *extra)
    assert result.code == 0, result
    return load_folder(out)


@pytest.fixture(scope="session")
def llama_base(workdir):
    path = workdir / "llama_base"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_adapter(workdir):
    path = workdir / "llama_lora"
    make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, init_lora_weights=False), path)
    return path


def test_llama_all_linears(run_cli, tmp_path, llama_base, llama_adapter):
    ours = merge_cli(run_cli, llama_base, [llama_adapter], tmp_path / "out")
    oracle = peft_merged_state(LlamaForCausalLM.from_pretrained(llama_base), [llama_adapter])
    assert changed(ours, load_folder(llama_base)) == 14
    assert max_diff(ours, oracle) <= 1e-6
    assert set(ours) == set(load_folder(llama_base))
    assert (tmp_path / "out" / "config.json").read_text() == (llama_base / "config.json").read_text()


def test_gpt2_conv1d_decided_from_base(run_cli, tmp_path):
    base = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(base)
    adapter = tmp_path / "gpt2_lora"
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False)
    make_adapter(tiny_gpt2(), config, adapter)
    # PEFT saves fan_in_fan_out unreliably; loratool must not depend on it.
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    ours = merge_cli(run_cli, base, [adapter], tmp_path / "out")
    cfg["fan_in_fan_out"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    oracle = peft_merged_state(GPT2LMHeadModel.from_pretrained(base), [adapter])
    assert changed(ours, load_folder(base)) == 8  # c_attn, attn.c_proj (square), mlp.c_fc, mlp.c_proj per layer
    assert max_diff(ours, oracle) <= 1e-6


def test_qwen2_rslora_with_rank_and_alpha_patterns(run_cli, tmp_path):
    base = tmp_path / "qwen2"
    tiny_qwen2().save_pretrained(base)
    adapter = tmp_path / "qwen2_lora"
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LINEARS, init_lora_weights=False,
                        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                        alpha_pattern={"v_proj": 3, r"layers\.0\..*up_proj": 20})
    make_adapter(tiny_qwen2(), config, adapter)
    ours = merge_cli(run_cli, base, [adapter], tmp_path / "out")
    oracle = peft_merged_state(Qwen2ForCausalLM.from_pretrained(base), [adapter])
    assert max_diff(ours, oracle) <= 1e-6
    report = json.loads(run_cli("inspect", adapter, "--json").stdout)
    ranks = {(g["target"], g["rank"], g["alpha"]) for g in report["groups"]}
    assert ("q_proj", 2, 8.0) in ranks and ("down_proj", 6, 8.0) in ranks and ("v_proj", 4, 3.0) in ranks
    assert report["use_rslora"] is True
    scale = {g["target"]: g["scale"] for g in report["groups"] if g["target"] == "up_proj" and g["alpha"] == 20}
    assert scale["up_proj"] == pytest.approx(20 / math.sqrt(4))


def test_dora(run_cli, tmp_path, llama_base):
    adapter = tmp_path / "dora"
    make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                          use_dora=True, init_lora_weights=False), adapter)
    ours = merge_cli(run_cli, llama_base, [adapter], tmp_path / "out")
    oracle = peft_merged_state(LlamaForCausalLM.from_pretrained(llama_base), [adapter])
    assert changed(ours, load_folder(llama_base)) == 5
    assert max_diff(ours, oracle) <= 1e-6


def test_embedding_adapter_with_saved_base_layer(run_cli, tmp_path, llama_base):
    adapter = tmp_path / "embed"
    make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                          init_lora_weights=False), adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in saved)
    ours = merge_cli(run_cli, llama_base, [adapter], tmp_path / "out")
    oracle = peft_merged_state(LlamaForCausalLM.from_pretrained(llama_base), [adapter])
    assert max_diff(ours, oracle) <= 1e-6
    assert not torch.equal(ours["model.embed_tokens.weight"], load_folder(llama_base)["model.embed_tokens.weight"])


def test_conv2d_model_single_file(run_cli, tmp_path):
    torch.manual_seed(0)
    model = TinyConvNet()
    base_file = tmp_path / "conv.safetensors"
    save_file(model.state_dict(), base_file)
    adapter = tmp_path / "conv_lora"
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["conv_in", "conv_mid", "proj"], init_lora_weights=False)
    peft_model = get_peft_model(TinyConvNet(), config)
    randomize_adapter(peft_model)
    peft_model.save_pretrained(adapter)
    out = tmp_path / "merged.safetensors"
    ours = merge_cli(run_cli, base_file, [adapter], out)
    fresh = TinyConvNet()
    fresh.load_state_dict(load_file(base_file))
    oracle = PeftModel.from_pretrained(fresh, adapter).merge_and_unload().state_dict()
    assert changed(ours, load_file(base_file)) == 3
    assert max_diff(ours, oracle) <= 1e-6


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (8 significant bits)."""
    mag = x.double().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def test_bf16_base_rounds_once(run_cli, tmp_path, llama_adapter):
    base = tmp_path / "bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(base)
    ours = merge_cli(run_cli, base, [llama_adapter], tmp_path / "out")
    oracle = peft_merged_state(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), [llama_adapter])
    base_state = load_folder(base)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    for name in ours:
        diff = (ours[name].double() - oracle[name].double()).abs()
        spacing = bf16_ulp(torch.maximum(ours[name].double().abs(), oracle[name].double().abs()))
        assert (diff <= spacing).all(), name
    # Rounding once: ours is the float64 result rounded to bf16, up to float32 accumulation order.
    q = "model.layers.0.self_attn.q_proj"
    adapter_state = load_file(llama_adapter / "adapter_model.safetensors")
    A = adapter_state[f"base_model.model.{q}.lora_A.weight"].double()
    B = adapter_state[f"base_model.model.{q}.lora_B.weight"].double()
    exact = base_state[f"{q}.weight"].double() + 2.0 * B @ A
    err = (ours[f"{q}.weight"].double() - exact).abs()
    assert (err <= 0.5 * bf16_ulp(exact) * (1 + 1e-3)).all()


def test_three_shard_base_roundtrips_through_transformers(run_cli, tmp_path, llama_adapter):
    base = tmp_path / "sharded"
    tiny_llama().save_pretrained(base, max_shard_size="40KB")
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) == 3
    out = tmp_path / "out"
    ours = merge_cli(run_cli, base / "model.safetensors.index.json", [llama_adapter], out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    for name, file in index["weight_map"].items():
        assert name in load_file(out / file)
    oracle = peft_merged_state(LlamaForCausalLM.from_pretrained(base), [llama_adapter])
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert max_diff({k: reloaded[k] for k in ours}, oracle) <= 1e-6

    resharded = tmp_path / "resharded"
    merge_cli(run_cli, base, [llama_adapter], resharded, "--max-shard-size", "25KB")
    files = sorted(p.name for p in resharded.glob("*.safetensors"))
    assert len(files) > 3 and files[0].startswith("model-00001-of-")
    assert all(p.stat().st_size <= 25_000 + 4096 or len(load_file(p)) == 1 for p in resharded.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(resharded).state_dict()
    assert max_diff({k: reloaded[k] for k in ours}, oracle) <= 1e-6


def test_two_adapters_with_weights(run_cli, tmp_path, llama_base, llama_adapter):
    second = tmp_path / "second"
    make_adapter(tiny_llama(), LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                          init_lora_weights=False), second, seed=7)
    ours = merge_cli(run_cli, llama_base, [llama_adapter, second], tmp_path / "out", "--weights", "0.7,-0.4")
    oracle = peft_merged_state(LlamaForCausalLM.from_pretrained(llama_base), [llama_adapter, second], [0.7, -0.4])
    assert max_diff(ours, oracle) <= 1e-6
    # Independent float64 algebra for one module both adapters touch.
    q = "model.layers.1.self_attn.q_proj"
    expected = load_folder(llama_base)[f"{q}.weight"].double()
    for path, w, s in ((llama_adapter, 0.7, 2.0), (second, -0.4, 8.0)):
        st = load_file(path / "adapter_model.safetensors")
        expected += w * s * st[f"base_model.model.{q}.lora_B.weight"].double() @ st[f"base_model.model.{q}.lora_A.weight"].double()
    assert (ours[f"{q}.weight"].double() - expected).abs().max() <= 1e-6


def test_merge_then_unmerge_gives_back_the_base(run_cli, tmp_path, llama_base, llama_adapter):
    merged = tmp_path / "merged"
    merge_cli(run_cli, llama_base, [llama_adapter], merged)
    restored = merge_cli(run_cli, merged, [llama_adapter], tmp_path / "restored", "--weights", "-1")
    assert max_diff(restored, load_folder(llama_base)) <= 1e-6


def test_lora_bias_and_modules_to_save(run_cli, tmp_path):
    base = tmp_path / "qwen2"
    tiny_qwen2().save_pretrained(base)  # Qwen2's q/k/v projections carry biases
    adapter = tmp_path / "bias_lora"
    peft_model = make_adapter(tiny_qwen2(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                       lora_bias=True, modules_to_save=["lm_head"],
                                                       init_lora_weights=False), adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.bias") for k in saved) and "base_model.model.lm_head.weight" in saved
    with torch.no_grad():  # make the saved lm_head differ from the base, so replacing it is observable
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(adapter)
    ours = merge_cli(run_cli, base, [adapter], tmp_path / "out")
    oracle = peft_merged_state(Qwen2ForCausalLM.from_pretrained(base), [adapter])
    base_state = load_folder(base)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.bias"], base_state["model.layers.0.self_attn.q_proj.bias"])
    assert not torch.equal(ours["lm_head.weight"], base_state["lm_head.weight"])
    assert max_diff(ours, oracle) <= 1e-6


def test_dora_after_plain_lora_follows_peft_order(run_cli, tmp_path, llama_base, llama_adapter):
    dora = tmp_path / "dora"
    make_adapter(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], use_dora=True,
                                          init_lora_weights=False), dora, seed=5)
    ours = merge_cli(run_cli, llama_base, [llama_adapter, dora], tmp_path / "out")
    oracle = peft_merged_state(LlamaForCausalLM.from_pretrained(llama_base), [llama_adapter, dora])
    assert max_diff(ours, oracle) <= 1e-6
