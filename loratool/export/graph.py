"""Building the PyTorch side of an export: the (merged) transformers model, LoRA input slots for
multi-adapter graphs, sample inputs, and the ONNX export call itself.

Export goes through transformers' `OnnxExporter` (the dynamo exporter plus the patches LLM graphs
need); onnx, onnxscript, onnxruntime and transformers come with the `onnx` extra.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError

#: transformers model types the export is tested on (tests/test_onnx.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
TASKS = ("causal-lm",)
LORA_KWARG = "lora"
SAMPLE_BATCH, SAMPLE_SEQUENCE, SAMPLE_PAST = 2, 7, 6
#: Sample ranks start here and differ per module, so torch.export gives every rank its own dynamic
#: dimension instead of unifying equal sample sizes (duck sizing).
FIRST_SAMPLE_RANK = 8


def require_onnx_stack() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UsageError(f"ONNX export needs the onnx extra ({e.name} is missing): pip install 'loratool[onnx]'") from e


def model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{model_dir} has no config.json: export needs the architecture, not just the weights")
    from ..jsonio import MODEL_CONFIG_RULES, read_json

    config = read_json(path, UsageError, rules=MODEL_CONFIG_RULES)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"{model_dir}: model type {model_type!r} is not supported for ONNX export; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def load_model(model_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    return model.eval()


class LoraSlot(torch.nn.Module):
    """A linear layer plus a LoRA branch whose A (r × in) and B (out × r, scale folded in) are graph
    inputs, set for each call by the model's forward pre-hook. Works for nn.Linear and HF Conv1D,
    since the branch only uses the input and output features."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.transpose(0, 1)) @ self.lora_B.transpose(0, 1)


def input_key(module: str, part: str) -> str:
    """The key of a LoRA tensor in the `lora` input dict; the graph input is `lora_<key>`."""
    return f"{module.replace('.', '_')}_{part}".lower()


def graph_input_name(module: str, part: str) -> str:
    return f"{LORA_KWARG}_{input_key(module, part)}"


def attach_lora_slots(model, modules: list[str]) -> dict[str, LoraSlot]:
    """Wrap each named linear in a LoraSlot and let the model take `lora={key: tensor}` at call time."""
    slots = {}
    for name in modules:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        if not isinstance(base, torch.nn.Linear) and type(base).__name__ != "Conv1D":
            raise UsageError(f"--adapter-inputs supports LoRA on linear layers only; {name} is {type(base).__name__}")
        slots[name] = LoraSlot(base)
        setattr(parent, leaf, slots[name])

    def take_lora_inputs(module, args, kwargs):
        lora = kwargs.pop(LORA_KWARG)
        for name, slot in slots.items():
            slot.lora_A, slot.lora_B = lora[input_key(name, "a")], lora[input_key(name, "b")]
        return args, kwargs

    model.register_forward_pre_hook(take_lora_inputs, with_kwargs=True)
    return slots


def features(slot: LoraSlot) -> tuple[int, int]:
    """(in, out) of the wrapped layer."""
    base = slot.base
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    return base.weight.shape[0], base.weight.shape[1]  # HF Conv1D stores (in, out)


def sample_lora(slots: dict[str, LoraSlot], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for i, (name, slot) in enumerate(slots.items()):
        rank, (fan_in, fan_out) = FIRST_SAMPLE_RANK + i, features(slot)
        inputs[input_key(name, "a")] = (torch.randn(rank, fan_in, generator=generator) * 0.01).to(dtype)
        inputs[input_key(name, "b")] = (torch.randn(fan_out, rank, generator=generator) * 0.01).to(dtype)
    return inputs


def sample_inputs(model, with_past: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    if not with_past:
        ids = torch.randint(0, vocab, (SAMPLE_BATCH, SAMPLE_SEQUENCE), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    prompt = torch.randint(0, vocab, (SAMPLE_BATCH, SAMPLE_PAST + SAMPLE_SEQUENCE), generator=generator)
    with torch.no_grad():
        cache = model(input_ids=prompt[:, :SAMPLE_PAST], use_cache=True).past_key_values
    return {"input_ids": prompt[:, SAMPLE_PAST:], "attention_mask": torch.ones_like(prompt), "past_key_values": cache,
            "use_cache": True}


def export_to_folder(model, inputs: dict, folder: Path, opset: int | None) -> list[str]:
    """Export with transformers' OnnxExporter (dynamic axes) and save model.onnx + model.onnx.data."""
    import contextlib
    import io
    import logging
    import warnings

    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter
    from transformers.utils import logging as transformers_logging

    # The exporter narrates its stages with print() and warns about its own experimental status and
    # about optional torchvision ops; none of it is actionable here, and stdout is for results (--json).
    # Failures still surface as exceptions.
    transformers_logging.set_verbosity_error()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = OnnxExporter().export(model, inputs, config=OnnxConfig(dynamic=True, opset_version=opset))
        exported.save_pretrained(str(folder))
    return [value.name for value in exported.program.graph.inputs]
