"""End to end in real llama.cpp (through llama-cpp-python, when it is installed): the base as a GGUF
model, our adapter loaded with `lora_path`, logits compared with PEFT's unmerged forward pass.

This is the check no reading of llama.cpp's source can replace: the file loads, the names, the
transposed embedding, the q/k row order and the scale are what llama.cpp really uses. llama-cpp-python
compiles llama.cpp on install, so it is not a test extra and this file is not collected by `make test`:
run it with `python -m pytest tests/llamacpp_check.py` after `pip install llama-cpp-python`.
The base GGUF is written here with the gguf package, in llama.cpp's own layout for the `llama` arch
(q/k rows interleaved per head), by this file's own code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import LLAMA_LINEARS, make_adapter, tiny_llama, tiny_qwen2

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TOKENS = [0, 5, 17, 33, 2, 64, 91, 7, 48, 12]


def interleave(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF halves (j, j + d/2) -> llama.cpp's rotary pairs (2j, 2j+1), per head."""
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(rows.shape)


def write_base_gguf(base_dir: Path, out: Path, arch: str) -> None:
    """`arch` is llama.cpp's: `llama` (q/k rows interleaved) or `qwen2` (HF order, q/k/v biases)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = model.config
    state = load_file(str(base_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = ["<unk>", "<s>", "</s>", "<0x0A>"] + [f"\u2581t{i}" for i in range(4, config.vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3, 6] + [1] * (len(tokens) - 4))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, value in state.items():
        value = value.float()
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "lm_head.weight":
            target = "output.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            target = f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                value = interleave(value, config.num_attention_heads)
            if arch == "llama" and module == "self_attn.k_proj":
                value = interleave(value, config.num_key_value_heads)
        writer.add_tensor(target, value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llamacpp_logits(model_path: Path, lora_path: Path | None) -> np.ndarray:
    kwargs = dict(model_path=str(model_path), n_ctx=32, n_batch=32, logits_all=True, verbose=False, n_threads=1,
                  type_k=0, type_v=0)  # f32 KV cache: nothing but the adapter's own rounding in the comparison
    if lora_path is not None:
        kwargs["lora_path"] = str(lora_path)
    llm = llama_cpp.Llama(**kwargs)
    llm.eval(TOKENS)
    logits = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.close()
    return logits


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"llamacpp-{arch}")
    BUILDERS[arch]().save_pretrained(root / "base")
    write_base_gguf(root / "base", root / "base.gguf", arch)
    return root, arch


def test_base_gguf_matches_transformers(setup):
    """The check of this file's own base writer: without an adapter, llama.cpp equals transformers."""
    root, _ = setup
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    assert rel(llamacpp_logits(root / "base.gguf", None), torch_logits(base)) < 1e-4


@pytest.mark.parametrize("name, config", [
    ("all-linears-rslora", LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_LINEARS,
                                      rank_pattern={"k_proj": 4}, alpha_pattern={"o_proj": 3},
                                      init_lora_weights=False)),
    ("embedding-lm-head", LoraConfig(r=4, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "q_proj"],
                                     init_lora_weights=False)),
])
def test_llamacpp_with_our_adapter_matches_peft(run_cli, setup, name, config):
    root, arch = setup
    adapter = root / name
    make_adapter(BUILDERS[arch](), config, adapter)
    out = root / f"{name}.gguf"
    assert run_cli("convert", adapter, "--to", "gguf", "--base", root / "base", "-o", out).code == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), str(adapter)).eval()
    expected = torch_logits(peft)
    base_only = torch_logits(AutoModelForCausalLM.from_pretrained(root / "base"))
    got = llamacpp_logits(root / "base.gguf", out)
    assert rel(base_only, expected) > 1e-2  # the adapter really changes the output
    assert rel(got, expected) < 1e-4
