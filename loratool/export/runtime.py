"""The onnxruntime side: sessions, validation against PyTorch, KV-cache generation, and multi-LoRA
adapter files (`.onnx_adapter`) for graphs exported with LoRA inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

VALIDATION_SHAPES = ((1, 5), (3, 11))


def providers(choice: str = "cpu") -> tuple[list[str], str | None]:
    """onnxruntime providers for `auto|cpu|cuda`, and a note when CUDA was asked for but is missing."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"], None
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
    note = "CUDAExecutionProvider is not available (needs onnxruntime-gpu and a GPU); ran on CPU"
    if choice == "cuda":
        raise UsageError(note.replace("; ran on CPU", ""))
    return ["CPUExecutionProvider"], None if choice == "auto" and not torch.cuda.is_available() else note


def session(path: Path, provider: str = "cpu", spinning: bool = True):
    """An onnxruntime session. `spinning=False` stops its worker threads from busy-waiting after each
    run, which would otherwise steal the cores from whatever runs next (benchmarks run several
    sessions and PyTorch in one process)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers(provider)[0])


def input_names(onnx_session) -> set[str]:
    """Required inputs plus those with a default (an initializer of the same name, like the empty LoRA
    defaults), which onnxruntime lists separately."""
    optional = onnx_session.get_overridable_initializers() if hasattr(onnx_session, "get_overridable_initializers") else []
    return {i.name for i in onnx_session.get_inputs()} | {i.name for i in optional}


def _inputs(batch: int, sequence: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, sequence), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def max_diff_against_torch(onnx_session, model, lora: dict[str, torch.Tensor] | None = None) -> list[float]:
    """max |logits_ort − logits_torch| at each validation shape (float32 comparison)."""
    diffs = []
    names = input_names(onnx_session)
    for seed, (batch, sequence) in enumerate(VALIDATION_SHAPES):
        ids, mask = _inputs(batch, sequence, model.config.vocab_size, seed)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        kwargs = {}
        if lora is not None:
            feeds.update({f"lora_{k}": v.numpy() for k, v in lora.items() if f"lora_{k}" in names})
            kwargs["lora"] = lora
        (logits, *_) = onnx_session.run(None, feeds)
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        diffs.append(float(np.abs(logits.astype(np.float32) - reference.float().numpy()).max()))
    return diffs


def _cache_layout(onnx_session) -> tuple[list[str], list[str], dict]:
    past = [i for i in onnx_session.get_inputs() if i.name.startswith("past_key_values.")]
    present = [o.name for o in onnx_session.get_outputs() if o.name.startswith("cache.")]
    return [i.name for i in past], present, {i.name: i for i in past}


def empty_cache(onnx_session, batch: int, config) -> dict[str, np.ndarray]:
    """Past-key/value inputs of length 0, for the first (prompt) step."""
    names, _, _ = _cache_layout(onnx_session)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = np.float16 if "float16" in onnx_session.get_inputs()[-1].type else np.float32
    return {name: np.zeros((batch, heads, 0, head_dim), dtype=dtype) for name in names}


def greedy_generate(onnx_session, config, input_ids: np.ndarray, new_tokens: int,
                    step_logits: list | None = None) -> np.ndarray:
    """Greedy decoding with the exported KV cache: the prompt in one step, then one token per step.
    `step_logits`, when given, collects each step's logits (for validation)."""
    past_names, present_names, _ = _cache_layout(onnx_session)
    if not past_names:
        raise UsageError("this graph has no past_key_values inputs; export it with --with-past")
    output_names = [o.name for o in onnx_session.get_outputs()]
    past = empty_cache(onnx_session, input_ids.shape[0], config)
    tokens, step = input_ids, input_ids
    for _ in range(new_tokens):
        feeds = {"input_ids": step, "attention_mask": np.ones(tokens.shape, dtype=np.int64), **past}
        results = dict(zip(output_names, onnx_session.run(None, feeds)))
        if step_logits is not None:
            step_logits.append(results["logits"])
        step = results["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens = np.concatenate([tokens, step], axis=1)
        past = {p: results[q] for p, q in zip(past_names, present_names)}
    return tokens


def write_onnx_adapter(path: Path, parameters: dict[str, np.ndarray]) -> None:
    """An onnxruntime `.onnx_adapter` file: graph input name -> tensor, activated per run()."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                            for name, value in parameters.items()})
    adapter.export_adapter(str(path))


def run_options_with(adapter_path: Path | None):
    """(RunOptions activating one `.onnx_adapter`, or none for the base model; the loaded adapter,
    which must stay alive while the options are used)."""
    import onnxruntime as ort

    options, adapter = ort.RunOptions(), None
    if adapter_path is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_path))
        options.add_active_adapter(adapter)
    return options, adapter
