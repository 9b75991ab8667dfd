"""CLIP text encoders in their namings: Hugging Face (`encoder.layers.N.self_attn.q_proj`, with or
without transformers 4's `text_model.` level) and OpenCLIP (`transformer.resblocks.N.attn.in_proj_weight`,
q/k/v stacked by rows, as SD2 and SDXL single files store them)."""

from __future__ import annotations

import re

TEXT_MODEL = "text_model."
#: OpenCLIP resblock leaf -> Hugging Face encoder-layer leaf.
RESBLOCK_LEAVES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
#: The fused attention input projection and the modules it stacks, in row order.
IN_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
#: OpenCLIP top-level tensors -> (Hugging Face module, whether the tensor is stored transposed).
TOP_LEVEL = {
    "token_embedding.weight": ("embeddings.token_embedding", False),
    "positional_embedding": ("embeddings.position_embedding", False),
    "ln_final.weight": ("final_layer_norm", False),
    "ln_final.bias": ("final_layer_norm", False),
    "text_projection": ("text_projection", True),
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
#: Module paths under `text_model.` in transformers 4 (the projection head sits beside it).
_UNDER_TEXT_MODEL = ("encoder.layers.", "embeddings.", "final_layer_norm")


def without_text_model(path: str) -> str:
    return path[len(TEXT_MODEL):] if path.startswith(TEXT_MODEL) else path


def with_text_model(path: str) -> str:
    """transformers 4's path for a module path without the `text_model.` level."""
    return TEXT_MODEL + path if path.startswith(_UNDER_TEXT_MODEL) else path


def open_clip_tensor(key: str) -> tuple[tuple[str, ...], str, bool] | None:
    """For an OpenCLIP tensor key: (Hugging Face modules in row order, parameter, transposed), or None."""
    if key in TOP_LEVEL:
        module, transposed = TOP_LEVEL[key]
        return (module,), "bias" if key.endswith(".bias") else "weight", transposed
    match = _RESBLOCK.match(key)
    if not match:
        return None
    layer, leaf = match.group(1), match.group(2)
    prefix = f"encoder.layers.{layer}."
    if leaf in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return tuple(prefix + part for part in IN_PROJ), leaf.rsplit("_", 1)[1], False
    module, _, param = leaf.rpartition(".")
    if module in RESBLOCK_LEAVES:
        return (prefix + RESBLOCK_LEAVES[module],), param, False
    return None


def open_clip_module(key: str) -> str:
    """The module path a LoRA trained on OpenCLIP names for a tensor key (`…attn.in_proj` for in_proj_weight)."""
    if key.endswith(("_weight", "_bias")) and ".in_proj_" in key:
        return key.rsplit("_", 1)[0]
    return key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
