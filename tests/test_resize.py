"""`loratool resize` against float64 truncated SVD of the ΔW that PEFT itself computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from helpers import LLAMA_LINEARS, TinyConvNet, fixture_base, lora_deltas, make_adapter, rel, tiny_llama

FIXTURES = Path(__file__).parent.parent / "fixtures"
PREFIX = "base_model.model."


def peft_deltas(base_model, adapter) -> dict[str, torch.Tensor]:
    """Module name -> ΔW as PEFT computes it (its own scale, rsLoRA and patterns), in float64."""
    return lora_deltas(PeftModel.from_pretrained(base_model, str(adapter)))


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    flat = delta.reshape(delta.shape[0], -1)
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).reshape(delta.shape)


def resize_cli(run_cli, adapter, out, *args):
    result = run_cli("resize", adapter, "-o", out, *args)
    assert result.code == 0, result
    return result


@pytest.mark.parametrize("fixture", ["lora-llama", "lora-llama-qv"])
def test_resize_equals_truncated_svd(run_cli, tmp_path, fixture):
    """lora-llama-qv has rsLoRA, alpha ≠ r and a rank_pattern (v_proj at r=2)."""
    original = peft_deltas(fixture_base(), FIXTURES / fixture)
    report = json.loads(resize_cli(run_cli, FIXTURES / fixture, tmp_path / "r3", "--rank", "3", "--json").stdout)
    resized = peft_deltas(fixture_base(), tmp_path / "r3")
    assert set(resized) == set(original)
    errors = {m["name"]: m["relative_error"] for m in report["modules"]}
    for name, delta in original.items():
        expected = truncated(delta, 3)
        assert rel(resized[name], expected) < 1e-5, name
        assert errors[name] == pytest.approx(rel(resized[name], delta), abs=1e-6)
        assert torch.linalg.matrix_rank(resized[name], rtol=1e-5) == min(3, torch.linalg.matrix_rank(delta, rtol=1e-5))
    config = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 3


def test_rank_at_or_above_current_is_exact(run_cli, tmp_path):
    original = peft_deltas(fixture_base(), FIXTURES / "lora-llama")
    result = resize_cli(run_cli, FIXTURES / "lora-llama", tmp_path / "r8", "--rank", "8")
    assert "exact" in result.stderr
    resized = peft_deltas(fixture_base(), tmp_path / "r8")
    assert all(rel(resized[n], d) < 1e-6 for n, d in original.items())


def test_energy_picks_rank_from_the_product_spectrum(run_cli, tmp_path):
    original = peft_deltas(fixture_base(), FIXTURES / "lora-llama")
    report = json.loads(resize_cli(run_cli, FIXTURES / "lora-llama", tmp_path / "e", "--energy", "0.8", "--json").stdout)
    ranks = {m["name"]: m["rank"] for m in report["modules"]}
    for name, delta in original.items():
        energy = torch.linalg.svdvals(delta).square().cumsum(0)
        expected = int((energy < 0.8 * energy[-1]).sum()) + 1
        assert ranks[name] == expected, name
    assert len(set(ranks.values())) > 1
    resized = peft_deltas(fixture_base(), tmp_path / "e")  # PEFT reads the rank_pattern
    assert all(rel(resized[n], truncated(d, ranks[n])) < 1e-5 for n, d in original.items())


def test_embedding_conv_and_lora_bias(run_cli, tmp_path):
    llama_adapter = tmp_path / "emb"
    make_adapter(tiny_llama(), LoraConfig(r=6, lora_alpha=3, target_modules=["embed_tokens", "q_proj"],
                                          lora_bias=False, init_lora_weights=False), llama_adapter)
    original = peft_deltas(tiny_llama(), llama_adapter)
    resize_cli(run_cli, llama_adapter, tmp_path / "emb2", "-r", "2")
    resized = peft_deltas(tiny_llama(), tmp_path / "emb2")
    assert "model.embed_tokens" in resized
    # the embedding weight PEFT saves beside embedding LoRA goes back under PEFT's own key
    written = load_file(str(tmp_path / "emb2" / "adapter_model.safetensors"))
    assert PREFIX + "model.embed_tokens.base_layer.weight" in written
    assert all(rel(resized[n], truncated(d, 2)) < 1e-5 for n, d in original.items())

    def conv_net():
        torch.manual_seed(0)
        return TinyConvNet()

    conv_adapter = tmp_path / "conv"
    make_adapter(conv_net(), LoraConfig(r=4, lora_alpha=2, target_modules=["conv_in", "proj"], lora_bias=True,
                                        init_lora_weights=False), conv_adapter)
    original = peft_deltas(conv_net(), conv_adapter)
    resize_cli(run_cli, conv_adapter, tmp_path / "conv2", "-r", "2")
    resized = peft_deltas(conv_net(), tmp_path / "conv2")
    assert all(rel(resized[n], truncated(d, 2)) < 1e-5 for n, d in original.items())
    # the lora_B bias is scaled by the old scale, since the new scale is 1
    merged = {}
    for name in ("conv", "conv2"):
        merged[name] = PeftModel.from_pretrained(conv_net(), str(tmp_path / name)).merge_and_unload().state_dict()
    base = conv_net().state_dict()
    assert not torch.equal(merged["conv"]["proj.bias"], base["proj.bias"])
    assert torch.allclose(merged["conv2"]["proj.bias"], merged["conv"]["proj.bias"], atol=1e-6)


def test_modules_to_save_are_carried_over(run_cli, tmp_path):
    adapter = tmp_path / "mts"
    make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                          init_lora_weights=False), adapter)
    with torch.no_grad():
        model = PeftModel.from_pretrained(tiny_llama(), str(adapter))
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
        model.save_pretrained(str(tmp_path / "mts1"))
    resize_cli(run_cli, tmp_path / "mts1", tmp_path / "mts2", "-r", "4")
    config = json.loads((tmp_path / "mts2" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    ours = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mts2")).merge_and_unload().state_dict()
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mts1")).merge_and_unload().state_dict()
    assert not torch.equal(theirs["lm_head.weight"], tiny_llama().state_dict()["lm_head.weight"])
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-6


def test_dora_and_bad_ranks_are_refused(run_cli, tmp_path):
    dora = tmp_path / "dora"
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_LINEARS, use_dora=True, init_lora_weights=False), dora)
    result = run_cli("resize", dora, "-o", tmp_path / "out", "-r", "2")
    assert result.code == 2 and "DoRA" in result.stderr and "magnitude" in result.stderr
    for args, message in ((["-r", "0"], "--rank must be a positive integer"),
                          (["--energy", "0"], "--energy must be a fraction"),
                          ([], "exactly one of --rank and --energy")):
        result = run_cli("resize", FIXTURES / "lora-llama", "-o", tmp_path / "out", *args)
        assert result.code == 2 and message in result.stderr, result
    assert not (tmp_path / "out").exists()
    into_input = run_cli("resize", FIXTURES / "lora-llama", "-o", FIXTURES / "lora-llama", "-r", "2", "--force")
    assert into_input.code == 2 and "input" in into_input.stderr


def test_resize_output_merges_like_the_truncated_delta(run_cli, tmp_path):
    """End to end through loratool merge: the merged weights move by exactly the truncated ΔW."""
    base = FIXTURES / "tiny-llama"
    resize_cli(run_cli, FIXTURES / "lora-llama", tmp_path / "r2", "-r", "2")
    assert run_cli("merge", base, tmp_path / "r2", "-o", tmp_path / "merged").code == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    original = peft_deltas(fixture_base(), FIXTURES / "lora-llama")
    base_state = fixture_base().state_dict()
    for name, delta in original.items():
        moved = merged[f"{name}.weight"].double() - base_state[f"{name}.weight"].double()
        assert rel(moved, truncated(delta, 2)) < 1e-5
