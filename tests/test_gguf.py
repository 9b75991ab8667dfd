"""`convert --to gguf` against PEFT, read back with the registry `gguf` package's own GGUFReader.

The oracle rebuilds what llama.cpp applies, written here independently of loratool: per pair,
alpha / rank · B·A with the rank from lora_b's shape and the token embedding's lora_a transposed,
the llama-arch q/k row order undone, GGUF names mapped back by a table of our own. That must equal
PEFT's `merge_and_unload() − base`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from helpers import (LLAMA_LINEARS, assert_refused, make_adapter, ok, peft_merged_state, randomize_adapter, rel,
                     tiny_gpt2, tiny_llama, tiny_qwen2)

#: GGUF target -> HF module suffix: our own reading of llama.cpp's names, not loratool's.
HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head"}
TOLERANCE = {"F32": 1e-5, "F16": 2e-3, "BF16": 1.5e-2, "Q8_0": 1.5e-2}


def field_value(reader: GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents()


def read_pairs(path: Path) -> tuple[GGUFReader, dict[str, tuple[np.ndarray, np.ndarray, str, str]]]:
    reader = GGUFReader(str(path))
    halves: dict[str, dict[str, tuple[np.ndarray, str]]] = {}
    for t in reader.tensors:
        stem, _, half = t.name.rpartition(".")
        shape = tuple(reversed([int(d) for d in t.shape]))
        values = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        halves.setdefault(stem, {})[half] = (values, t.tensor_type.name)
    pairs = {stem: (h["lora_a"][0], h["lora_b"][0], h["lora_a"][1], h["lora_b"][1]) for stem, h in halves.items()}
    return reader, pairs


def hf_name(gguf_stem: str) -> str:
    stem = gguf_stem.removesuffix(".weight")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.weight"
    _, layer, target = stem.split(".", 2)
    return f"model.layers.{layer}.{HF_NAMES[target]}.weight"


def unpermute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Back from llama.cpp's interleaved rotary pairs (2j, 2j+1) to HF's halves (j, j + d/2)."""
    return rows.reshape(n_heads, rows.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(rows.shape)


def llamacpp_deltas(path: Path, heads: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """HF weight name -> the ΔW llama.cpp applies from this file (heads: (q, kv) to undo, or None)."""
    reader, pairs = read_pairs(path)
    alpha = float(field_value(reader, "adapter.lora.alpha"))
    deltas = {}
    for stem, (a, b, _, _) in pairs.items():
        a, b = torch.from_numpy(a), torch.from_numpy(b)
        scale = alpha / b.shape[1]
        if stem == "token_embd.weight":
            delta = scale * (b @ a.T).T
        else:
            delta = scale * (b @ a)
            if heads and ".attn_q." in stem:
                delta = unpermute(delta, heads[0])
            if heads and ".attn_k." in stem:
                delta = unpermute(delta, heads[1])
        deltas[hf_name(stem)] = delta
    return deltas


def peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    base = load_file(str(base_dir / "model.safetensors"))
    merged = peft_merged_state(AutoModelForCausalLM.from_pretrained(base_dir), [adapter_dir])
    deltas = {k: merged[k].double() - base[k].double() for k in base}
    return {k: d for k, d in deltas.items() if d.abs().max() > 0}


def assert_matches_peft(gguf_path: Path, base_dir: Path, adapter_dir: Path, heads, tolerance: float = 1e-5):
    ours, oracle = llamacpp_deltas(gguf_path, heads), peft_deltas(base_dir, adapter_dir)
    assert set(ours) == set(oracle) and oracle
    worst = max(rel(ours[k], oracle[k]) for k in oracle)
    assert worst < tolerance, worst
    return worst


# --- models and adapters, built once --------------------------------------------------------------------


def tiny_mistral(seed: int = 0):
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, vocab_size=96,
                                            max_position_embeddings=64, tie_word_embeddings=False)).eval()


def tiny_qwen3(seed: int = 0):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96,
                                        max_position_embeddings=64, tie_word_embeddings=False)).eval()


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "qwen3": tiny_qwen3}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def bases(root) -> dict[str, Path]:
    paths = {}
    for name, build in BUILDERS.items():
        build().save_pretrained(root / f"base-{name}")
        paths[name] = root / f"base-{name}"
    return paths


def adapter(root: Path, name: str, arch: str, config: LoraConfig, seed: int = 1) -> Path:
    path = root / name
    if not path.exists():
        make_adapter(BUILDERS[arch](), config, path, seed=seed)
    return path


@pytest.fixture(scope="module")
def llama_all(root) -> Path:
    return adapter(root, "llama-all", "llama", LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_LINEARS,
                                                          rank_pattern={"down_proj": 32}, init_lora_weights=False))


@pytest.fixture(scope="module")
def qwen2_patterns(root) -> Path:
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_LINEARS,
                        rank_pattern={"v_proj": 4, "down_proj": 16}, alpha_pattern={"o_proj": 4, "up_proj": 40},
                        init_lora_weights=False)
    return adapter(root, "qwen2-patterns", "qwen2", config)


# --- exact deltas -----------------------------------------------------------------------------------------


def test_llama_gqa_all_linears_matches_peft(run_cli, root, bases, llama_all):
    out = root / "llama-all.gguf"
    result = ok(run_cli("convert", llama_all, "--to", "gguf", "--base", bases["llama"], "-o", out, "--json"))
    summary = json.loads(result.stdout)
    assert summary["architecture"] == "llama" and summary["to"] == "gguf" and summary["modules"] == 14
    reader, pairs = read_pairs(out)
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "general.type") == "adapter"
    assert field_value(reader, "adapter.type") == "lora"
    assert reader.fields["adapter.lora.alpha"].types == [GGUFValueType.FLOAT32]
    a, b, type_a, type_b = pairs["blk.0.attn_k.weight"]
    assert a.shape == (8, 32) and b.shape == (16, 8) and type_a == type_b == "F32"  # (r × in), (kv·head_dim × r)
    assert pairs["blk.1.ffn_down.weight"][0].shape == (32, 64)
    assert_matches_peft(out, bases["llama"], llama_all, heads=(4, 2))


def test_llama_rows_really_are_permuted(root, bases, llama_all):
    """Reading the llama file as if it were not permuted must be wrong: the reorder is not a no-op."""
    out = root / "llama-all.gguf"
    ours, oracle = llamacpp_deltas(out, heads=None), peft_deltas(bases["llama"], llama_all)
    assert rel(ours["model.layers.0.self_attn.q_proj.weight"], oracle["model.layers.0.self_attn.q_proj.weight"]) > 0.1
    assert rel(ours["model.layers.0.self_attn.v_proj.weight"], oracle["model.layers.0.self_attn.v_proj.weight"]) < 1e-5


def test_qwen2_rslora_rank_and_alpha_patterns_match_peft(run_cli, root, bases, qwen2_patterns):
    """One global alpha, per-tensor rank: rsLoRA and alpha_pattern only survive folded into lora_b."""
    out = root / "qwen2.gguf"
    result = ok(run_cli("convert", qwen2_patterns, "--to", "gguf", "--base", bases["qwen2"], "-o", out, "--json"))
    assert json.loads(result.stdout)["architecture"] == "qwen2"
    assert "folded into lora_b" in result.stderr
    reader, pairs = read_pairs(out)
    assert field_value(reader, "general.architecture") == "qwen2"
    assert pairs["blk.0.attn_v.weight"][1].shape == (16, 4)
    assert_matches_peft(out, bases["qwen2"], qwen2_patterns, heads=None)


def test_one_global_alpha_alone_would_be_wrong(root, bases, qwen2_patterns):
    """What llama.cpp's own converter writes for this adapter: the raw factors and lora_alpha. Applied
    as llama.cpp does, that is far from PEFT's delta (the √r of rsLoRA, the ignored alpha_pattern)."""
    oracle = peft_deltas(bases["qwen2"], qwen2_patterns)
    state = load_file(str(qwen2_patterns / "adapter_model.safetensors"))
    num = den = 0.0
    for key, a in state.items():
        if ".lora_A." in key:
            b = state[key.replace("lora_A", "lora_B")].double()
            naive = 16 / b.shape[1] * (b @ a.double())
            target = oracle[key.removeprefix("base_model.model.").replace(".lora_A", "")]
            num, den = num + float((naive - target).square().sum()), den + float(target.square().sum())
    assert (num / den) ** 0.5 > 0.3


@pytest.mark.parametrize("arch, gguf_arch, heads", [("mistral", "llama", (4, 1)), ("qwen3", "qwen3", None)])
def test_mistral_and_qwen3(run_cli, root, bases, arch, gguf_arch, heads):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], init_lora_weights=False)
    path = adapter(root, f"{arch}-qk", arch, config)
    out = root / f"{arch}.gguf"
    ok(run_cli("convert", path, "--to", "gguf", "--base", bases[arch], "-o", out))
    assert field_value(GGUFReader(str(out)), "general.architecture") == gguf_arch
    assert_matches_peft(out, bases[arch], path, heads=heads)


def test_embedding_and_untied_lm_head(run_cli, root, bases):
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "q_proj"],
                        init_lora_weights=False)
    path = adapter(root, "llama-embed", "llama", config)
    out = root / "embed.gguf"
    result = ok(run_cli("convert", path, "--to", "gguf", "--base", bases["llama"], "-o", out))
    _, pairs = read_pairs(out)
    assert pairs["token_embd.weight"][0].shape == (96, 4)  # lora_a transposed: (vocab × r)
    assert pairs["token_embd.weight"][1].shape == (32, 4)
    assert pairs["output.weight"][0].shape == (4, 32) and pairs["output.weight"][1].shape == (96, 4)
    assert_matches_peft(out, bases["llama"], path, heads=(4, 2))
    saved = load_file(str(path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT's save_embedding_layers
    assert "changes nothing" in result.stderr and "model.embed_tokens.weight" in result.stderr


def test_config_only_base_gives_the_same_file(run_cli, root, bases, llama_all, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(bases["llama"] / "config.json", config_only / "config.json")
    ok(run_cli("convert", llama_all, "--to", "gguf", "--base", config_only, "-o", tmp_path / "a.gguf"))
    if not (root / "llama-all.gguf").exists():
        ok(run_cli("convert", llama_all, "--to", "gguf", "--base", bases["llama"], "-o", root / "llama-all.gguf"))
    assert (tmp_path / "a.gguf").read_bytes() == (root / "llama-all.gguf").read_bytes()


def test_kohya_input_takes_the_same_path(run_cli, root, bases, qwen2_patterns, tmp_path):
    ok(run_cli("convert", qwen2_patterns, "--to", "kohya", "-o", tmp_path / "k.safetensors"))
    ok(run_cli("convert", tmp_path / "k.safetensors", "--to", "gguf", "--base", bases["qwen2"],
               "-o", tmp_path / "k.gguf"))
    assert_matches_peft(tmp_path / "k.gguf", bases["qwen2"], qwen2_patterns, heads=None)


# --- dtypes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, ggml", [("float16", "F16"), ("bfloat16", "BF16"), ("q8_0", "Q8_0")])
def test_dtypes_round_trip_within_their_precision(run_cli, root, bases, llama_all, tmp_path, dtype, ggml):
    out = tmp_path / f"{dtype}.gguf"
    result = ok(run_cli("convert", llama_all, "--to", "gguf", "--base", bases["llama"], "-o", out, "--dtype", dtype))
    _, pairs = read_pairs(out)
    if ggml == "Q8_0":
        # lora_a rows hold `in` values (32 or 64) and quantize; lora_b rows hold r = 8 values and cannot,
        # except down_proj's, whose rank_pattern gives r = 32.
        assert pairs["blk.0.attn_q.weight"][2] == "Q8_0" and pairs["blk.0.attn_q.weight"][3] == "F16"
        assert pairs["blk.0.ffn_down.weight"][3] == "Q8_0"
        fallen = sorted(f"{stem}.lora_{half}" for stem, p in pairs.items()
                        for half, t in zip("ab", p[2:]) if t == "F16")
        assert len(fallen) == 12 and all(name.endswith(".lora_b") for name in fallen)
        assert f"{len(fallen)} tensor(s) written as f16" in result.stderr and fallen[0] in result.stderr
    else:
        assert {t for p in pairs.values() for t in p[2:]} == {ggml}
    worst = assert_matches_peft(out, bases["llama"], llama_all, heads=(4, 2), tolerance=TOLERANCE[ggml])
    assert worst > 1e-7  # really rounded


def test_auto_keeps_a_bf16_adapter_bf16(run_cli, root, bases, qwen2_patterns, tmp_path):
    """--dtype auto (the default, which crashes llama.cpp's converter) keeps each tensor's own type; the
    modules that need no rescaling keep their exact bits."""
    ok(run_cli("convert", qwen2_patterns, "--to", "peft", "--dtype", "bfloat16", "-o", tmp_path / "bf16"))
    ok(run_cli("convert", tmp_path / "bf16", "--to", "gguf", "--base", bases["qwen2"], "-o", tmp_path / "bf16.gguf"))
    _, pairs = read_pairs(tmp_path / "bf16.gguf")
    assert {t for p in pairs.values() for t in p[2:]} == {"BF16"}
    source = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    assert torch.equal(torch.from_numpy(pairs["blk.0.attn_q.weight"][0]), source[key.format("A")].double())
    assert torch.equal(torch.from_numpy(pairs["blk.0.attn_q.weight"][1]), source[key.format("B")].double())
    assert_matches_peft(tmp_path / "bf16.gguf", bases["qwen2"], tmp_path / "bf16", heads=None,
                        tolerance=TOLERANCE["BF16"])


# --- inspect ----------------------------------------------------------------------------------------------


def test_inspect_reads_gguf_adapters(run_cli, root, bases, qwen2_patterns):
    out = root / "qwen2-inspect.gguf"
    ok(run_cli("convert", qwen2_patterns, "--to", "gguf", "--base", bases["qwen2"], "-o", out, "--dtype", "q8_0"))
    report = json.loads(ok(run_cli("inspect", out, "--json", "--tensors", "--check")).stdout)
    reader, pairs = read_pairs(out)
    assert report["kind"] == "adapter" and report["format"] == "gguf" and report["architecture"] == "qwen2"
    assert report["lora_alpha"] == pytest.approx(float(field_value(reader, "adapter.lora.alpha")))
    assert report["targets"] == sorted(HF_NAMES) and report["layers"] == [0, 1] and report["modules"] == 14
    ranks = {(g["target"], g["rank"]) for g in report["groups"]}
    assert ranks == {(t, {"attn_v": 4, "ffn_down": 16}.get(t, 8)) for t in HF_NAMES}
    assert report["r"] == 8 and report["algorithms"] == {"lora": 14}
    assert sum(g["parameters"] for g in report["groups"]) == sum(int(t.n_elements) for t in reader.tensors)
    assert report["dtypes"]["Q8_0"]["tensors"] == 14 and report["dtypes"]["F16"]["tensors"] == 14
    assert report["tensors"] == len(report["tensor_list"]) == 28 and report["nonfinite"] == {}
    listed = {t["name"]: t for t in report["tensor_list"]}
    assert listed["blk.0.attn_v.weight.lora_b"]["shape"] == list(pairs["blk.0.attn_v.weight"][1].shape)
    table = ok(run_cli("inspect", out)).stdout
    assert "qwen2" in table and "attn_v" in table
    (root / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 7)
    assert_refused(run_cli("inspect", root / "junk.gguf"), root / "nothing-written", "junk.gguf", "GGUF")


def test_inspect_reads_gguf_models_too(run_cli, tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.ones((96, 32), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.full(32, np.inf, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("inspect", tmp_path / "model.gguf", "--json", "--check")
    assert result.code == 2  # --check found the Inf
    report = json.loads(result.stdout)
    assert report["kind"] == "checkpoint" and report["architecture"] == "llama" and report["tensors"] == 2
    assert report["dtypes"]["F16"] == {"tensors": 1, "parameters": 96 * 32, "bytes": 96 * 32 * 2}
    assert report["nonfinite"] == {"output_norm.weight": {"nan": 0, "inf": 32}}
    assert "llama" in ok(run_cli("inspect", tmp_path / "model.gguf")).stdout


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, config, needles", [
    ("dora", dict(use_dora=True, target_modules=["q_proj", "v_proj"]), ("DoRA", "magnitude", "q_proj")),
    ("bias", dict(lora_bias=True, target_modules=["v_proj"]), ("lora_B biases", "v_proj")),
])
def test_refused_adapter_features(run_cli, root, bases, tmp_path, name, config, needles):
    path = adapter(root, f"refuse-{name}", "llama", LoraConfig(r=4, init_lora_weights=False, **config))
    out = tmp_path / "out.gguf"
    assert_refused(run_cli("convert", path, "--to", "gguf", "--base", bases["llama"], "-o", out), out, *needles)


def test_refused_lycoris_algorithms(run_cli, bases, tmp_path):
    from peft import LoHaConfig

    peft_model = get_peft_model(tiny_llama(), LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    peft_model.save_pretrained(str(tmp_path / "loha"))
    out = tmp_path / "out.gguf"
    result = run_cli("convert", tmp_path / "loha", "--to", "gguf", "--base", bases["llama"], "-o", out)
    assert_refused(result, out, "loha", "q_proj")


def test_refused_modules_to_save(run_cli, bases, tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                         init_lora_weights=False))
    randomize_adapter(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.01)
    peft_model.save_pretrained(str(tmp_path / "mts"))
    out = tmp_path / "out.gguf"
    result = run_cli("convert", tmp_path / "mts", "--to", "gguf", "--base", bases["llama"], "-o", out)
    assert_refused(result, out, "modules_to_save", "lm_head")


def test_refused_lm_head_of_tied_base(run_cli, tmp_path):
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    make_adapter(tiny_llama(tie_word_embeddings=True), LoraConfig(r=2, target_modules=["lm_head", "q_proj"],
                                                                  init_lora_weights=False), tmp_path / "head")
    out = tmp_path / "out.gguf"
    result = run_cli("convert", tmp_path / "head", "--to", "gguf", "--base", tmp_path / "tied", "-o", out)
    assert_refused(result, out, "lm_head", "tied", "output.weight")


def test_refused_architecture_without_a_map(run_cli, tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    make_adapter(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False), tmp_path / "a")
    out = tmp_path / "out.gguf"
    result = run_cli("convert", tmp_path / "a", "--to", "gguf", "--base", tmp_path / "gpt2", "-o", out)
    assert_refused(result, out, "GPT2LMHeadModel", "name map")


def test_refused_usage(run_cli, root, bases, llama_all, tmp_path):
    out = tmp_path / "out.gguf"
    assert_refused(run_cli("convert", llama_all, "--to", "gguf", "-o", out), out, "--base")
    assert_refused(run_cli("convert", llama_all, "--to", "gguf", "--base", bases["mistral"], "-o", out), out,
                   "wrong --base")
    assert_refused(run_cli("convert", llama_all, "--to", "gguf", "--base", bases["llama"], "-o", tmp_path / "x.bin"),
                   tmp_path / "x.bin", ".gguf")
    assert_refused(run_cli("convert", llama_all, "--to", "peft", "--dtype", "q8_0", "-o", tmp_path / "p"),
                   tmp_path / "p", "q8_0", "gguf")
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli("convert", llama_all, "--to", "gguf", "--base", tmp_path / "empty", "-o", out), out,
                   "config.json")


def test_python_api_and_lazy_import(root, bases, llama_all, tmp_path):
    import loratool

    result = loratool.convert(llama_all, tmp_path / "api.gguf", to="gguf", base=bases["llama"], dtype="float16")
    assert result.to_json()["tensor_types"] == {"F16": 28}
    hub = tmp_path / "hub-named"
    shutil.copytree(llama_all, hub)
    config = json.loads((hub / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (hub / "adapter_config.json").write_text(json.dumps(config))
    loratool.convert(hub, tmp_path / "hub.gguf", to="gguf", base=bases["llama"])
    reader = GGUFReader(str(tmp_path / "hub.gguf"))
    assert field_value(reader, "general.name") == "hub-named"
    assert field_value(reader, "general.base_model.0.name") == "Llama-3.2-1B"
    assert field_value(reader, "general.base_model.0.organization") == "meta-llama"
    assert field_value(reader, "general.base_model.0.repo_url") == "https://huggingface.co/meta-llama/Llama-3.2-1B"
    code = ("import sys; from loratool.cli import main; main(['--help']); main(['convert', '--help']); "
            "print('GGUF-LOADED' if 'gguf' in sys.modules else 'GGUF-NOT-LOADED')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(loratool.__file__).parent.parent), "PATH": "/usr/bin:/bin"})
    assert "GGUF-NOT-LOADED" in run.stdout
