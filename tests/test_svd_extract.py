"""`loratool svd-extract` against exact float64 linear algebra and the real PEFT loader."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from helpers import TinyConvNet, load_folder, optimal_error, rel, tiny_gpt2, tiny_llama, tiny_qwen2
from loratool.lora.svd import truncated_svd

PREFIX = "base_model.model."


def low_rank(shape, rank: int, generator: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    out, inp = shape[0], math.prod(shape[1:])
    left = torch.randn(out, rank, generator=generator)
    right = torch.randn(rank, inp, generator=generator)
    return (left @ right * scale / math.sqrt(rank)).reshape(shape)


def with_spectrum(shape, singular_values, generator: torch.Generator) -> torch.Tensor:
    """A matrix with exactly these singular values and random singular vectors."""
    k = len(singular_values)
    U = torch.linalg.qr(torch.randn(shape[0], k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(shape[1], k, generator=generator, dtype=torch.float64)).Q
    return ((U * torch.tensor(singular_values, dtype=torch.float64)) @ V.T).float()


def finetune(model, deltas: dict[str, torch.Tensor], folder):
    """Add `deltas` (by state-dict key) to `model` in place and save it; returns the folder."""
    state = model.state_dict()
    with torch.no_grad():
        for key, delta in deltas.items():
            state[key].add_(delta.to(state[key].dtype))
    model.save_pretrained(folder)
    return folder


def linear_keys(model, leaves=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    return [k for k, v in model.state_dict().items() if k.endswith(".weight") and k.split(".")[-2] in leaves]


def adapter_products(folder) -> dict[str, torch.Tensor]:
    """Module name -> B@A in float64 (PEFT's (out, in) orientation), times the config's scale."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    products = {}
    for key in state:
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                module = key[len(PREFIX): -len(a_suffix)]
                A, B = state[key].double(), state[key[: -len(a_suffix)] + b_suffix].double()
                rank = A.shape[0]
                alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
                assert config["rank_pattern"].get(module, config["r"]) == rank
                products[module] = (B.reshape(B.shape[0], rank) @ A.reshape(rank, -1)) * alpha / rank
    return products


@pytest.fixture(scope="session")
def llama_pair(workdir):
    """A tiny Llama and a fine-tune whose every linear moved by an exactly rank-3 ΔW."""
    base = workdir / "svd_base"
    tiny_llama().save_pretrained(base)
    model = tiny_llama()
    generator = torch.Generator().manual_seed(7)
    deltas = {k: low_rank(model.state_dict()[k].shape, 3, generator) for k in linear_keys(model)}
    return base, finetune(model, deltas, workdir / "svd_ft"), deltas


def extract(run_cli, base, finetuned, out, *args):
    result = run_cli("svd-extract", base, finetuned, "-o", out, *args)
    assert result.code == 0, result
    return result


def test_exact_low_rank_delta_is_recovered(run_cli, tmp_path, llama_pair):
    base, finetuned, deltas = llama_pair
    result = extract(run_cli, base, finetuned, tmp_path / "a", "--rank", "3", "--json")
    products = adapter_products(tmp_path / "a")
    assert set(products) == {k.removesuffix(".weight") for k in deltas}
    for key, delta in deltas.items():
        assert rel(products[key.removesuffix(".weight")], delta) < 1e-5
    report = json.loads(result.stdout)
    assert report["totals"]["modules"] == 14 and report["totals"]["relative_error"] < 1e-5
    assert report["unchanged_tensors"] == len(load_folder(base)) - 14
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (3, 3, {})
    assert config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted({k.split(".")[-2] for k in deltas})
    # a higher rank than ΔW has is still exact, and the output is deterministic
    extract(run_cli, base, finetuned, tmp_path / "b", "--rank", "5")
    extract(run_cli, base, finetuned, tmp_path / "c", "--rank", "5")
    assert (tmp_path / "b/adapter_model.safetensors").read_bytes() == (tmp_path / "c/adapter_model.safetensors").read_bytes()
    for key, delta in deltas.items():
        assert rel(adapter_products(tmp_path / "b")[key.removesuffix(".weight")], delta) < 1e-5


def test_peft_loads_output_and_its_delta_is_ours(run_cli, tmp_path, llama_pair):
    base, finetuned, deltas = llama_pair
    extract(run_cli, base, finetuned, tmp_path / "a", "--rank", "3")
    products = adapter_products(tmp_path / "a")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(tmp_path / "a"))
    layers = {n.removeprefix(PREFIX): m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}
    assert set(layers) == set(products)
    for name, layer in layers.items():
        assert torch.allclose(layer.get_delta_weight("default").double(), products[name], atol=1e-7)
    merged = model.merge_and_unload().state_dict()
    tuned = load_folder(finetuned)
    assert max((merged[k] - tuned[k]).abs().max().item() for k in tuned) < 1e-5


def test_noisy_deltas_within_two_percent_of_optimal(run_cli, tmp_path, workdir):
    """Large enough that the randomized path runs (sketch < half of min(m, n))."""
    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=1)
    base = workdir / "svd_noisy_base"
    tiny_llama(**shape).save_pretrained(base)
    model = tiny_llama(**shape)
    generator = torch.Generator().manual_seed(3)
    deltas = {}
    for key in linear_keys(model):
        out, inp = model.state_dict()[key].shape
        decay = [0.5 * (i + 1) ** -0.7 for i in range(min(out, inp))]
        deltas[key] = with_spectrum((out, inp), decay, generator) + 0.002 * torch.randn(out, inp, generator=generator)
    finetuned = finetune(model, deltas, tmp_path / "ft")
    for flag, bound in (("--json", 1.02), ("--exact", 1.0 + 1e-4)):
        out = tmp_path / flag.strip("-")
        report = json.loads(extract(run_cli, base, finetuned, out, "--rank", "8", flag, "--json").stdout)
        errors = {m["name"]: m["relative_error"] for m in report["modules"]}
        products = adapter_products(out)
        for key, delta in deltas.items():
            module = key.removesuffix(".weight")
            achieved = torch.linalg.matrix_norm(products[module] - delta.double()).item()
            optimum = optimal_error(delta, 8)
            assert optimum < achieved <= bound * optimum, (module, achieved / optimum)
            assert errors[module] == pytest.approx(achieved / torch.linalg.matrix_norm(delta.double()).item(), rel=1e-3)


def test_randomized_svd_on_slow_spectra():
    """The default oversampling and power iterations on hard spectra: slow decay, flat noise."""
    generator = torch.Generator().manual_seed(0)
    matrices = [
        with_spectrum((400, 300), [(i + 1) ** -0.2 for i in range(300)], generator),
        torch.randn(400, 300, generator=generator),
        with_spectrum((300, 500), [1.0] * 5 + [0.3 * (i + 1) ** -0.5 for i in range(295)], generator),
    ]
    for matrix in matrices:
        for rank in (4, 16, 32):
            U, S, Vh = truncated_svd(matrix, rank)
            achieved = torch.linalg.matrix_norm((matrix - U * S @ Vh).double()).item()
            assert achieved <= 1.02 * optimal_error(matrix, rank)


def test_gpt2_conv1d_orientation(run_cli, tmp_path):
    base = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(base)
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(5)
    keys = [k for k, v in model.state_dict().items() if k.split(".")[-2] in ("c_attn", "c_proj", "c_fc") and v.dim() == 2]
    # Conv1D stores W as (in, out): PEFT's ΔW = (B@A)ᵀ with A (r, in), B (out, r)
    deltas = {k: low_rank(model.state_dict()[k].shape[::-1], 2, generator).T for k in keys}
    finetuned = finetune(model, deltas, tmp_path / "ft")
    extract(run_cli, base, finetuned, tmp_path / "a", "--rank", "2")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    a_key = PREFIX + "transformer.h.0.mlp.c_fc.lora_A.weight"
    assert state[a_key].shape == (2, 32) and state[a_key.replace("lora_A", "lora_B")].shape == (128, 2)
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(tmp_path / "a"))
    merged = peft_model.merge_and_unload().state_dict()
    tuned = load_folder(finetuned)
    assert max((merged[k] - tuned[k]).abs().max().item() for k in tuned) < 1e-5


def test_conv2d_model(run_cli, tmp_path):
    torch.manual_seed(0)
    net = TinyConvNet()
    base_state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(base_state, str(tmp_path / "base.safetensors"))
    generator = torch.Generator().manual_seed(2)
    deltas = {k: low_rank(base_state[k].shape, 2, generator) for k in ("conv_in.weight", "conv_mid.weight", "proj.weight")}
    save_file({k: v + deltas.get(k, 0) for k, v in base_state.items()}, str(tmp_path / "ft.safetensors"))
    extract(run_cli, tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "a", "-r", "2")
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert state[PREFIX + "conv_in.lora_A.weight"].shape == (2, 3, 3, 3)
    assert state[PREFIX + "conv_in.lora_B.weight"].shape == (8, 2, 1, 1)
    restored = TinyConvNet()
    restored.load_state_dict(base_state)
    merged = PeftModel.from_pretrained(restored, str(tmp_path / "a")).merge_and_unload().state_dict()
    for key, delta in deltas.items():
        assert rel(merged[key] - base_state[key], delta) < 1e-5


def test_energy_picks_rank_per_module(run_cli, tmp_path, llama_pair):
    base, _, _ = llama_pair
    model = tiny_llama()
    generator = torch.Generator().manual_seed(9)
    spectra = {  # energy fractions at 0.9: q needs 1, k needs 2, v needs 4
        "model.layers.0.self_attn.q_proj.weight": [10.0, 1.0, 1.0, 0.5],
        "model.layers.0.self_attn.k_proj.weight": [3.0, 3.0, 0.5, 0.5],
        "model.layers.0.self_attn.v_proj.weight": [1.0, 1.0, 1.0, 1.0, 0.1],
    }
    deltas = {k: with_spectrum(model.state_dict()[k].shape, s, generator) for k, s in spectra.items()}
    finetuned = finetune(model, deltas, tmp_path / "ft")
    expected = {}
    for key, s in spectra.items():
        energy = torch.tensor(s).square().cumsum(0) / torch.tensor(s).square().sum()
        expected[key.removesuffix(".weight")] = int((energy < 0.9).sum()) + 1
    assert sorted(expected.values()) == [1, 2, 4]
    report = json.loads(extract(run_cli, base, finetuned, tmp_path / "a", "--energy", "0.9", "--json").stdout)
    assert {m["name"]: m["rank"] for m in report["modules"]} == expected
    assert all(m["energy"] >= 0.9 for m in report["modules"])
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {m: config["rank_pattern"].get(m, config["r"]) for m in expected} == expected
    assert {m: config["alpha_pattern"].get(m, config["lora_alpha"]) for m in expected} == expected
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(tmp_path / "a"))
    capped = json.loads(extract(run_cli, base, finetuned, tmp_path / "b", "--energy", "0.9", "--max-rank", "2",
                                "--json").stdout)
    assert {m["name"]: m["rank"] for m in capped["modules"]} == {k: min(v, 2) for k, v in expected.items()}


def test_sharded_inputs(run_cli, tmp_path, llama_pair):
    base, finetuned, _ = llama_pair
    model = LlamaForCausalLM.from_pretrained(finetuned)
    model.save_pretrained(tmp_path / "ft_sharded", max_shard_size="20KB")
    LlamaForCausalLM.from_pretrained(base).save_pretrained(tmp_path / "base_sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "ft_sharded").glob("*.safetensors"))) > 3
    extract(run_cli, base, finetuned, tmp_path / "whole", "-r", "3")
    extract(run_cli, tmp_path / "base_sharded", tmp_path / "ft_sharded" / "model.safetensors.index.json",
            tmp_path / "sharded", "-r", "3")
    assert load_file(str(tmp_path / "whole/adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "sharded/adapter_model.safetensors")).keys()
    ours, theirs = adapter_products(tmp_path / "whole"), adapter_products(tmp_path / "sharded")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_keep_full_reproduces_norms_biases_and_head(run_cli, tmp_path):
    """Qwen2 has q/k/v biases: they travel as bias="lora_only"; norms and lm_head as modules_to_save."""
    base = tmp_path / "qwen"
    tiny_qwen2().save_pretrained(base)
    model = tiny_qwen2()
    generator = torch.Generator().manual_seed(4)
    state = model.state_dict()
    deltas = {k: low_rank(state[k].shape, 2, generator) for k in linear_keys(model)}
    for key in ("model.layers.0.self_attn.q_proj.bias", "model.norm.weight", "lm_head.weight",
                "model.layers.1.input_layernorm.weight"):
        deltas[key] = 0.1 * torch.randn(state[key].shape, generator=generator)
    finetuned = finetune(model, deltas, tmp_path / "ft")

    dropped = run_cli("svd-extract", base, finetuned, "-o", tmp_path / "lossy", "-r", "2")
    assert dropped.code == 0 and "does not reproduce" in dropped.stderr and "lm_head.weight" in dropped.stderr
    assert "--keep-full" in dropped.stderr

    report = json.loads(extract(run_cli, base, finetuned, tmp_path / "a", "-r", "2", "--keep-full", "--json").stdout)
    assert {t["name"] for t in report["full_tensors"] if t["kept"]} == set(deltas) - set(linear_keys(model))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only"
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.layers.1.input_layernorm", "model.norm"]
    peft_model = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), str(tmp_path / "a"))
    merged = peft_model.merge_and_unload().state_dict()
    tuned = load_folder(finetuned)
    assert max((merged[k] - tuned[k]).abs().max().item() for k in tuned) < 1e-5
    # and loratool's own merge of the adapter gives the fine-tune back too
    assert run_cli("merge", base, tmp_path / "a", "-o", tmp_path / "merged").code == 0
    ours = load_folder(tmp_path / "merged")
    assert max((ours[k] - tuned[k]).abs().max().item() for k in tuned) < 1e-5


def test_embedding_targeted_on_request(run_cli, tmp_path, llama_pair):
    base, _, _ = llama_pair
    model = tiny_llama()
    generator = torch.Generator().manual_seed(6)
    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    deltas = {k: low_rank(model.state_dict()[k].shape, 2, generator) for k in keys}
    finetuned = finetune(model, deltas, tmp_path / "ft")
    default = run_cli("svd-extract", base, finetuned, "-o", tmp_path / "default", "-r", "2", "--json")
    assert default.code == 0 and "model.embed_tokens.weight" in default.stderr
    assert [m["name"] for m in json.loads(default.stdout)["modules"]] == ["model.layers.0.self_attn.q_proj"]
    extract(run_cli, base, finetuned, tmp_path / "a", "-r", "2", "--targets", "embed_tokens|q_proj")
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert state[PREFIX + "model.embed_tokens.lora_embedding_A"].shape == (2, 96)
    assert state[PREFIX + "model.embed_tokens.lora_embedding_B"].shape == (32, 2)
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(tmp_path / "a")).merge_and_unload()
    tuned = load_folder(finetuned)
    merged_state = merged.state_dict()
    assert max((merged_state[k] - tuned[k]).abs().max().item() for k in tuned) < 1e-5


def test_rank_above_dimensions_is_capped_with_a_note(run_cli, tmp_path, llama_pair):
    base, finetuned, deltas = llama_pair
    result = extract(run_cli, base, finetuned, tmp_path / "a", "-r", "40", "--json")
    assert "rank capped" in result.stderr
    ranks = {m["name"]: (m["rank"], m["shape"]) for m in json.loads(result.stdout)["modules"]}
    assert all(rank == min(shape) for rank, shape in ranks.values())
    assert all(rel(adapter_products(tmp_path / "a")[k.removesuffix(".weight")], d) < 1e-5 for k, d in deltas.items())


@pytest.mark.parametrize("args, message", [
    (["-r", "0"], "--rank must be a positive integer"),
    (["-r", "-3"], "--rank must be a positive integer"),
    ([], "exactly one of --rank and --energy"),
    (["-r", "2", "--energy", "0.9"], "exactly one of --rank and --energy"),
    (["--energy", "1.5"], "--energy must be a fraction"),
    (["-r", "2", "--targets", "("], "not a valid regular expression"),
    (["-r", "2", "--targets", "no_such_module"], "none of the changed tensors is a low-rank target"),
])
def test_usage_errors(run_cli, tmp_path, llama_pair, args, message):
    base, finetuned, _ = llama_pair
    result = run_cli("svd-extract", base, finetuned, "-o", tmp_path / "a", *args)
    assert result.code == 2 and message in result.stderr, result
    assert "Traceback" not in result.stderr and not (tmp_path / "a").exists()


def test_mismatched_and_identical_checkpoints(run_cli, tmp_path, llama_pair):
    base, finetuned, _ = llama_pair
    same = run_cli("svd-extract", base, base, "-o", tmp_path / "a", "-r", "2")
    assert same.code == 2 and "identical weights" in same.stderr
    state = load_folder(finetuned)
    extra = dict(state, **{"extra.weight": torch.zeros(2, 2)})
    del extra["model.norm.weight"]
    extra["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(extra, str(tmp_path / "odd.safetensors"))
    result = run_cli("svd-extract", base / "model.safetensors", tmp_path / "odd.safetensors", "-o", tmp_path / "a", "-r", "2")
    assert result.code == 2, result
    for expected in ("only in BASE: model.norm.weight", "only in FINETUNED: extra.weight",
                     "model.layers.0.mlp.up_proj.weight [64, 32] vs [3, 3]"):
        assert expected in result.stderr
    assert not (tmp_path / "a").exists()


def test_bad_outputs_and_nonfinite(run_cli, tmp_path, llama_pair):
    base, finetuned, _ = llama_pair
    into_input = run_cli("svd-extract", base, finetuned, "-o", finetuned / "adapter", "-r", "2")
    assert into_input.code == 2 and "inside, the input" in into_input.stderr
    as_file = run_cli("svd-extract", base, finetuned, "-o", tmp_path / "a.safetensors", "-r", "2")
    assert as_file.code == 2 and "adapter folder" in as_file.stderr
    state = load_folder(finetuned)
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    before = (tmp_path / "nan.safetensors").read_bytes()
    nan = run_cli("svd-extract", base / "model.safetensors", tmp_path / "nan.safetensors", "-o", tmp_path / "a", "-r", "2")
    assert nan.code == 2 and "model.layers.1.self_attn.o_proj.weight" in nan.stderr and "NaN" in nan.stderr
    assert not (tmp_path / "a").exists() and (tmp_path / "nan.safetensors").read_bytes() == before
