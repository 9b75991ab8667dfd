"""Builders for tiny real models and real PEFT adapters, shared by the tests and the fixture script."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIXTURES = Path(__file__).parent.parent / "fixtures"


# -- checks shared by the test files ------------------------------------------------------------------


def ok(result):
    """A CLI result that succeeded (exit 0), returned for chaining."""
    assert result.code == 0, result
    return result


def assert_refused(result, out=None, *needles) -> str:
    """A refusal: exit 2, one `Error:` line on stderr naming each needle, no traceback, and, given OUT,
    nothing written: neither OUT nor a temp sibling. Returns the line."""
    from loratool.checkpoint.output import TEMP_MARK

    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result
    assert "Traceback" not in result.stderr, result
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists(), out
        assert not [p for p in out.parent.iterdir() if TEMP_MARK in p.name], "a temp output was left behind"
    return lines[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of `a` against `b`, in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / max(torch.linalg.vector_norm(b), 1e-30))


def optimal_error(matrix: torch.Tensor, rank: int) -> float:
    """The Frobenius error of the best rank-`rank` approximation (Eckart-Young)."""
    s = torch.linalg.svdvals(matrix.double())
    return float(s[rank:].square().sum().sqrt())


def fixture_base() -> LlamaForCausalLM:
    """The base the committed fixture adapters were trained on."""
    return LlamaForCausalLM.from_pretrained(FIXTURES / "tiny-llama")


def assert_unbroken(text: str, words, width: int = 80) -> None:
    """Rich output that fits `width` columns and shows each of `words` whole, on one line."""
    lines = text.splitlines()
    assert all(len(line.rstrip()) <= width for line in lines), "\n".join(lines)
    for word in words:
        assert any(word in line for line in lines), (word, text)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


class TinyConvNet(torch.nn.Module):
    """A small conv + linear model, standing in for a UNet block."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv_mid = torch.nn.Conv2d(8, 8, kernel_size=1)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv_mid(torch.relu(self.conv_in(x)))
        return self.proj(h.mean(dim=(2, 3)))


def randomize_adapter(model, seed: int = 1) -> None:
    """Give every LoRA tensor random, non-trivial values so that merges are actually tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=generator) * 0.1
                if "magnitude" in name:
                    param.mul_(1 + noise.to(param.dtype))
                else:
                    param.copy_(noise.to(param.dtype))


def make_adapter(model, config: LoraConfig, out_dir, seed: int = 1):
    """Wrap `model` with PEFT, randomize the adapter, save it with PEFT's own save_pretrained."""
    peft_model = get_peft_model(model, config)
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(str(out_dir))
    return peft_model


def peft_merged_state(base_model, adapter_dirs, weights=None) -> dict[str, torch.Tensor]:
    """The oracle: PEFT's own load + merge_and_unload on a freshly loaded base."""
    model = PeftModel.from_pretrained(base_model, str(adapter_dirs[0]), adapter_name="a0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    if weights is not None:
        model.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
        names = ["mix"]
    model.base_model.set_adapter(names)
    merged = model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_folder(path) -> dict[str, torch.Tensor]:
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def tiny_unet(seed: int = 0):
    """A ~50k-parameter Stable-Diffusion-style UNet2DConditionModel built from a config."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def lora_deltas(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Module name -> ΔW (float64) from the PEFT layers inside `model`: the oracle for any loader."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): module.get_delta_weight(adapter_name).double()
            for name, module in model.named_modules()
            if hasattr(module, "get_delta_weight")
            and adapter_name in {**getattr(module, "lora_A", {}), **getattr(module, "lora_embedding_A", {})}}


def save_loralib_checkpoints(folder) -> torch.nn.Module:
    """Train a small loralib model (Embedding + two Linears, alpha 8) a few steps and save, with
    safetensors, `train.safetensors` (state_dict() in train mode: W0 and A/B), `eval.safetensors`
    (after eval(), which merges ΔW into the weights) and `pretrained.safetensors` (W0 alone)."""
    import loralib
    from pathlib import Path

    from safetensors.torch import save_file

    class LoralibNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = loralib.Embedding(20, 8, r=2, lora_alpha=8)
            self.proj = loralib.Linear(8, 12, r=4, lora_alpha=8)
            self.head = loralib.Linear(12, 5, r=3, lora_alpha=8)
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, ids):
            return self.head(torch.relu(self.proj(self.norm(self.embed(ids))))).mean(1)

    folder = Path(folder)
    torch.manual_seed(0)
    net = LoralibNet()
    pretrained = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    loralib.mark_only_lora_as_trainable(net)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        loss = net(torch.randint(0, 20, (4, 3), generator=generator)).square().mean() + net.proj.lora_B.sum() * 0.01
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.train()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(folder / "train.safetensors"))
    net.eval()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(folder / "eval.safetensors"))
    save_file({k: v.contiguous() for k, v in pretrained.items()}, str(folder / "pretrained.safetensors"))
    return net


def tiny_clip_text(seed: int = 0):
    """A one-layer CLIP text encoder, the Stable Diffusion text tower in miniature."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=50, max_position_embeddings=16)).eval()
