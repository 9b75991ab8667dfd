"""`loratool combine` against exact float64 sums and PEFT's own `merge_utils` functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils import merge_utils

from helpers import LLAMA_LINEARS, fixture_base, make_adapter, optimal_error, rel
from loratool.lora.combine import module_seed

FIXTURES = Path(__file__).parent.parent / "fixtures"
PREFIX = "base_model.model."


def peft_deltas(adapter) -> dict[str, torch.Tensor]:
    """Module -> ΔW as PEFT computes it (its own scale, rsLoRA and patterns), float64, PEFT's (out, in) view."""
    model = PeftModel.from_pretrained(fixture_base(), str(adapter))
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight"):
            delta = module.get_delta_weight("default").double()
            deltas[name.removeprefix(PREFIX)] = delta.T if "embed" in name else delta
    return deltas


@pytest.fixture(scope="module")
def third_adapter(tmp_path_factory):
    """Different targets (mlp + embedding), rank and alpha from the two committed fixtures."""
    path = tmp_path_factory.mktemp("combine") / "mlp_embed"
    config = LoraConfig(r=6, lora_alpha=3, target_modules=["gate_proj", "down_proj", "embed_tokens"],
                        init_lora_weights=False)
    make_adapter(fixture_base(), config, path, seed=5)
    return path


@pytest.fixture(scope="module")
def inputs(third_adapter):
    """lora-llama (r8, all linears), lora-llama-qv (rsLoRA, r4 with v_proj r2, alpha 8), the third one."""
    paths = [FIXTURES / "lora-llama", FIXTURES / "lora-llama-qv", third_adapter]
    return paths, [peft_deltas(p) for p in paths]


def combined_target(deltas: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    names = sorted({n for d in deltas for n in d})
    return {n: sum(w * d[n] for d, w in zip(deltas, weights) if n in d) for n in names}


def combine_cli(run_cli, adapters, out, *args):
    result = run_cli("combine", *adapters, "-o", out, *args, "--json")
    assert result.code == 0, result
    return json.loads(result.stdout)


@pytest.mark.parametrize("method, extra", [("cat", []), ("linear", [])])
def test_exact_methods_equal_the_weighted_sum(run_cli, tmp_path, inputs, method, extra):
    paths, deltas = inputs
    weights = [0.7, -0.4, 1.3]
    report = combine_cli(run_cli, paths, tmp_path / "out", "--method", method, "--weights", "0.7,-0.4,1.3", *extra)
    ours = peft_deltas(tmp_path / "out")
    target = combined_target(deltas, weights)
    assert set(ours) == set(target)
    assert all(rel(ours[n], target[n]) < 1e-6 for n in target)
    ranks = {m["name"]: (m["ranks_in"], m["rank"]) for m in report["modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == ([8, 4, 0], 12)
    assert ranks["model.layers.0.self_attn.v_proj"] == ([8, 2, 0], 10)
    assert ranks["model.embed_tokens"] == ([0, 0, 6], 6)
    assert all(m["relative_error"] is None for m in report["modules"])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    assert config["rank_pattern"]["model.layers.0.self_attn.v_proj"] == 10
    assert config["alpha_pattern"]["model.layers.0.self_attn.v_proj"] == 10


@pytest.mark.parametrize("method, args", [("svd", ["--rank", "5"]), ("linear", ["--rank", "5"]), ("svd", [])])
def test_compressed_factor_methods_are_optimal(run_cli, tmp_path, inputs, method, args):
    paths, deltas = inputs
    weights = [1.0, 0.5, 0.25]
    report = combine_cli(run_cli, paths, tmp_path / "out", "--method", method, "--weights", "1,0.5,0.25", *args)
    ours = peft_deltas(tmp_path / "out")
    target = combined_target(deltas, weights)
    errors = {m["name"]: m for m in report["modules"]}
    for name, matrix in target.items():
        rank = 5 if args else max(r for r in errors[name]["ranks_in"])
        optimum = optimal_error(matrix, rank)
        achieved = float(torch.linalg.matrix_norm(ours[name] - matrix))
        assert achieved <= 1.02 * optimum + 1e-6 * float(torch.linalg.matrix_norm(matrix)), name
        assert errors[name]["rank"] == min(rank, torch.linalg.matrix_rank(matrix, rtol=1e-6))
        assert errors[name]["relative_error"] == pytest.approx(achieved / float(torch.linalg.matrix_norm(matrix)),
                                                               abs=1e-5)


def _peft_dense(method: str, tensors, weights, density, sign):
    w = torch.tensor(weights, dtype=tensors[0].dtype)
    if method == "ties":
        return merge_utils.ties(tensors, w, density, sign)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, w, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(tensors, w, density)
    return merge_utils.dare_ties(tensors, w, density, sign)


@pytest.mark.parametrize("method, sign", [("ties", "total"), ("ties", "frequency"), ("magnitude_prune", "total"),
                                          ("dare_linear", "total"), ("dare_ties", "frequency")])
def test_dense_methods_match_peft_merge_utils(run_cli, tmp_path, inputs, method, sign):
    """With a rank at least min(out, in) the SVD step is lossless, so the result is the method's target."""
    paths, deltas = inputs
    weights = [0.8, 0.6, 1.0]
    combine_cli(run_cli, paths, tmp_path / "full", "--method", method, "--weights", "0.8,0.6,1.0", "--density",
                "0.4", "--majority-sign", sign, "--rank", "128", "--seed", "11")
    ours = peft_deltas(tmp_path / "full")
    for name in sorted(ours):
        present = [(d[name].float(), w) for d, w in zip(deltas, weights) if name in d]
        torch.manual_seed(module_seed(11, name))  # PEFT's DARE draws from the global generator
        oracle = _peft_dense(method, [t for t, _ in present], [w for _, w in present], 0.4, sign).double()
        assert rel(ours[name], oracle) < 1e-5, name
    # compressed to the default rank (the largest input rank): within 2% of the optimum for that target
    report = combine_cli(run_cli, paths, tmp_path / "small", "--method", method, "--weights", "0.8,0.6,1.0",
                         "--density", "0.4", "--majority-sign", sign, "--seed", "11")
    small = peft_deltas(tmp_path / "small")
    for module in report["modules"]:
        name, rank = module["name"], module["rank"]
        target = ours[name]
        assert rank == max(module["ranks_in"])
        achieved = float(torch.linalg.matrix_norm(small[name] - target))
        assert achieved <= 1.02 * optimal_error(target, rank)
        assert module["relative_error"] == pytest.approx(achieved / float(torch.linalg.matrix_norm(target)), abs=1e-4)


def test_dare_is_deterministic_under_seed(run_cli, tmp_path, inputs):
    paths, _ = inputs
    args = ["--method", "dare_linear", "--density", "0.5"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        combine_cli(run_cli, paths[:2], tmp_path / name, *args, "--seed", seed)
    read = lambda name: (tmp_path / name / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert read("a") == read("b") and read("a") != read("c")


def test_factor_space_mixing_has_cross_terms_and_ours_does_not(run_cli, tmp_path, inputs):
    """The worked example in docs/combine.md: mixing A and B separately is far from Σ wᵢΔWᵢ."""
    paths, deltas = inputs
    from safetensors.torch import load_file

    states = [load_file(str(p / "adapter_model.safetensors")) for p in paths[:1]]
    other = tmp_path / "other"
    make_adapter(fixture_base(), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_LINEARS, init_lora_weights=False),
                 other, seed=9)
    states.append(load_file(str(other / "adapter_model.safetensors")))
    key = PREFIX + "model.layers.0.self_attn.q_proj"
    A1, B1, A2, B2 = (s[f"{key}.lora_{p}.weight"].double() for s in states for p in "AB")
    truth = 0.5 * (B1 @ A1) + 0.5 * (B2 @ A2)  # both have alpha/r = 2; the common scale cancels in the ratio
    mixed = (0.5 * B1 + 0.5 * B2) @ (0.5 * A1 + 0.5 * A2) * 2  # factor-space mixing, as PEFT's "linear"
    assert rel(mixed, truth) > 0.5
    combine_cli(run_cli, [paths[0], other], tmp_path / "ours", "--method", "linear", "--weights", "0.5,0.5")
    ours = peft_deltas(tmp_path / "ours")["model.layers.0.self_attn.q_proj"]
    assert rel(ours, 2 * truth) < 1e-6


def test_modules_to_save_carried_and_conflicts_refused(run_cli, tmp_path):
    def with_head(path, bump):
        make_adapter(fixture_base(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                init_lora_weights=False), path)
        model = PeftModel.from_pretrained(fixture_base(), str(path))
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.add_(bump)
        model.save_pretrained(str(path))

    with_head(tmp_path / "h1", 1.0)
    with_head(tmp_path / "h2", 2.0)
    conflict = run_cli("combine", tmp_path / "h1", tmp_path / "h2", "-m", "cat", "-o", tmp_path / "x")
    assert conflict.code == 2 and "lm_head" in conflict.stderr and "modules_to_save" in conflict.stderr
    combine_cli(run_cli, [tmp_path / "h1", FIXTURES / "lora-llama"], tmp_path / "ok", "-m", "cat")
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    merged = PeftModel.from_pretrained(fixture_base(), str(tmp_path / "ok")).merge_and_unload().state_dict()
    h1 = PeftModel.from_pretrained(fixture_base(), str(tmp_path / "h1")).merge_and_unload().state_dict()
    assert torch.equal(merged["lm_head.weight"], h1["lm_head.weight"])


@pytest.mark.parametrize("args, message", [
    (["-m", "cat", "--weights", "1"], "--weights has 1 values for 2 adapter(s)"),
    (["-m", "cat", "--weights", "a,b"], "is not a comma-separated list of numbers"),
    (["-m", "cat", "--weights", "1,nan"], "--weights must be finite"),
    (["-m", "cat", "--rank", "4"], "cat is exact"),
    (["-m", "ties"], "--method ties needs --density"),
    (["-m", "dare_linear", "--density", "0"], "--density must be a fraction"),
    (["-m", "svd", "--density", "0.5"], "--density applies to"),
    (["-m", "svd", "--rank", "0"], "--rank must be a positive integer"),
    (["-m", "average"], "Invalid value for '--method'"),
])
def test_usage_errors(run_cli, tmp_path, args, message):
    result = run_cli("combine", FIXTURES / "lora-llama", FIXTURES / "lora-llama-qv", "-o", tmp_path / "out", *args)
    assert result.code == 2 and message in result.stderr, result
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_refusals(run_cli, tmp_path):
    one = run_cli("combine", FIXTURES / "lora-llama", "-m", "cat", "-o", tmp_path / "out")
    assert one.code == 2 and "at least two adapters" in one.stderr
    dora = tmp_path / "dora"
    make_adapter(fixture_base(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), dora)
    refused = run_cli("combine", FIXTURES / "lora-llama", dora, "-m", "cat", "-o", tmp_path / "out")
    assert refused.code == 2 and "DoRA" in refused.stderr
    from helpers import tiny_llama

    foreign = tmp_path / "foreign"  # a different model: hidden 32 instead of 64
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), foreign)
    mismatch = run_cli("combine", FIXTURES / "lora-llama", foreign, "-m", "linear", "-o", tmp_path / "out")
    assert mismatch.code == 2 and "model.layers.0.self_attn.q_proj" in mismatch.stderr
    assert not (tmp_path / "out").exists()
