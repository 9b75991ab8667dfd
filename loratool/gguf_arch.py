"""What llama.cpp's `convert_hf_to_gguf.py` does to a transformers model: which GGUF architecture it
becomes, its tensor names (the `gguf` package's own name map, read both ways), and which q/k rows it
interleaves per head. Shared by the GGUF adapter writer (`formats/gguf.py`) and the GGUF base reader
(`checkpoint/gguf_base.py`); `gguf` is passed in by callers, which import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchRule:
    """How llama.cpp's `convert_hf_to_gguf.py` converts one transformers architecture."""

    member: str
    """The `gguf.MODEL_ARCH` member it converts to (its name map and `general.architecture`)."""
    permute_qk: bool
    """Whether it reorders q/k rows per head (`LlamaModel.permute`), which lora_b must then follow."""


#: transformers architecture -> llama.cpp's conversion of it. Only architectures whose LoRA path has
#: been checked end to end are listed; others are refused rather than guessed.
ARCHITECTURES: dict[str, ArchRule] = {
    "LlamaForCausalLM": ArchRule("LLAMA", True),
    "MistralForCausalLM": ArchRule("LLAMA", True),
    "Qwen2ForCausalLM": ArchRule("QWEN2", False),
    "Qwen3ForCausalLM": ArchRule("QWEN3", False),
}

#: GGML type -> the `LlamaFileType` recorded as `general.file_type`.
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}


def rope_heads(rule: ArchRule, kind: Any, n_heads: int, n_kv_heads: int, gguf) -> int | None:
    """The head count whose rotary pairs llama.cpp's converter interleaved in a tensor of `kind` (a
    `gguf.MODEL_TENSOR`): q uses the attention heads, k the KV heads; None where rows keep HF order."""
    if not rule.permute_qk or kind not in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
        return None
    return n_heads if kind == gguf.MODEL_TENSOR.ATTN_Q else n_kv_heads


def rule_for_gguf_arch(arch_name: str, gguf) -> tuple[str, ArchRule] | None:
    """(transformers architecture, rule) converted to GGUF architecture `arch_name` (`llama`: the first
    listed, Llama), or None for an architecture loratool has no name map for."""
    for architecture, rule in ARCHITECTURES.items():
        member = getattr(gguf.MODEL_ARCH, rule.member, None)
        if member is not None and gguf.MODEL_ARCH_NAMES[member] == arch_name:
            return architecture, rule
    return None


#: The module names transformers gives every architecture in ARCHITECTURES (`{bid}`: the layer). The
#: GGUF name map lists many source spellings per tensor (`q_norm` and persimmon's `q_layernorm` both
#: become `attn_q_norm`), so reading a file back needs the one these models use.
DECODER_MODULES = ("model.embed_tokens", "model.norm", "lm_head", *(f"model.layers.{{bid}}.{leaf}" for leaf in (
    "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))


def hf_names(rule: ArchRule, n_layers: int, gguf_names: list[str], gguf) -> dict[str, tuple[str, Any]]:
    """GGUF tensor name -> (transformers name, `gguf.MODEL_TENSOR` kind): DECODER_MODULES sent through
    llama.cpp's own name map, read backwards. Names no module maps to (computed tensors such as
    `rope_freqs`) are left out."""
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, rule.member), n_layers)
    backwards: dict[str, tuple[str, Any]] = {}
    for template in DECODER_MODULES:
        for bid in range(n_layers) if "{bid}" in template else (None,):
            module = template.format(bid=bid)
            found = name_map.get_type_and_name(module)
            if found is not None:
                backwards[found[1]] = (module, found[0])
    found_names = {}
    for name in gguf_names:
        stem, dot, suffix = name.rpartition(".")
        if dot and stem in backwards:
            module, kind = backwards[stem]
            found_names[name] = (f"{module}.{suffix}", kind)
    return found_names
