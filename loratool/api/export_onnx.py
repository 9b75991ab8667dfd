"""`export-onnx`: a model, with adapters merged through `merge()`, to ONNX; validated against PyTorch.

With `adapter_inputs`, the base is exported once with every targeted layer's LoRA A and B as optional
graph inputs (empty by default, so no adapter), and each adapter is written as an onnxruntime
`.onnx_adapter` file to activate per `run()`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.output import atomic_output, check_output_path, copy_regular_file
from ..checkpoint.reader import COMPANION_FILES
from ..errors import LoratoolError, UsageError
from ..export.graph import (TASKS, attach_lora_slots, export_to_folder, features, graph_input_name, load_model,
                            model_config, require_onnx_stack, sample_inputs, sample_lora)
from ..export.runtime import VALIDATION_SHAPES, max_diff_against_torch, session, write_onnx_adapter
from ..formats.adapters import read_for_peft_output
from ..lora.module import Adapter
from ..lora.kinds import LayerKind
from .merge import merge

FACTS_NAME = "loratool_export.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ValidationError(LoratoolError):
    """The exported graph does not reproduce PyTorch within --atol."""


@dataclass
class ExportResult:
    output: Path
    model_type: str
    inputs: list[str]
    opset: int | None
    max_diff: list[float] | None
    adapters: list[str]
    adapter_files: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"output": str(self.output), "model_type": self.model_type, "inputs": self.inputs, "opset": self.opset,
                "validation_max_abs_diff": self.max_diff, "adapters": self.adapters,
                "adapter_files": self.adapter_files, "seconds": round(self.seconds, 2), "notes": self.notes}


def _merged_dir(model_dir: Path, adapters: list, weights, work: Path, allow_pickle: bool) -> Path:
    if not adapters:
        return model_dir
    merged = work / "merged"
    merge(model_dir, adapters, merged, weights=weights, allow_pickle=allow_pickle)  # copies config.json too
    return merged


def _add_empty_lora_defaults(onnx_path: Path, modules: dict[str, tuple[int, int]], dtype: np.dtype) -> None:
    """Give every LoRA input an empty (rank 0) initializer of the same name: the default when no
    adapter is active, which makes the branch add exactly zero."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    for module, (fan_in, fan_out) in modules.items():
        for part, shape in (("a", (0, fan_in)), ("b", (fan_out, 0))):
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), graph_input_name(module, part)))
    onnx.save(model, str(onnx_path))


def _adapter_parameters(adapter: Adapter, modules: list[str], dtype: np.dtype) -> dict[str, np.ndarray]:
    parameters = {}
    for name in modules:
        module = adapter.modules.get(name)
        if module is None:
            continue
        parameters[graph_input_name(name, "a")] = module.lora_A.float().numpy().astype(dtype)
        parameters[graph_input_name(name, "b")] = (module.lora_B.float() * module.scale).numpy().astype(dtype)
    return parameters


def export_onnx(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    adapters: Sequence[str | os.PathLike] = (),
    weights: Sequence[float] | None = None,
    task: str = "causal-lm",
    opset: int | None = None,
    dtype: str = "float32",
    with_past: bool = False,
    validate: bool = True,
    atol: float = 1e-4,
    adapter_inputs: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
) -> ExportResult:
    """Export MODEL_DIR (+ adapters merged, or as LoRA inputs) to OUT_DIR/model.onnx and check it."""
    started = time.perf_counter()
    require_onnx_stack()
    model_dir, output = Path(model_dir), Path(output)
    if task not in TASKS:
        raise UsageError(f"--task {task!r} is not supported; supported: {', '.join(TASKS)}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if adapter_inputs and with_past:
        raise UsageError("--adapter-inputs and --with-past cannot be combined yet; export them separately")
    config = model_config(model_dir)
    check_output_path(output, [model_dir, *map(Path, adapters)], force)
    torch_dtype = DTYPES[dtype]
    notes: list[str] = []
    loaded = [read_for_peft_output(a, None, None, model_dir, allow_pickle) for a in adapters] if adapter_inputs else []
    with tempfile.TemporaryDirectory(prefix=".loratool-export-", dir=output.parent if output.parent.exists() else None) as work:
        source = model_dir if adapter_inputs else _merged_dir(model_dir, list(adapters), weights, Path(work), allow_pickle)
        model = load_model(source, torch_dtype)
        lora = None
        modules: list[str] = []
        if adapter_inputs:
            modules = _lora_modules(loaded)
            slots = attach_lora_slots(model, modules)
            lora = sample_lora(slots, torch_dtype)
        with atomic_output(output, is_folder=True) as temp:
            inputs = sample_inputs(model, with_past)
            if lora is not None:
                inputs["lora"] = lora
            graph_inputs = export_to_folder(model, inputs, temp, opset)
            adapter_files = []
            if adapter_inputs:
                np_dtype = np.float16 if torch_dtype == torch.float16 else np.float32
                _add_empty_lora_defaults(temp / "model.onnx", {m: features(slots[m]) for m in modules}, np_dtype)
                for i, adapter in enumerate(loaded):
                    name = f"adapter{i}_{Path(adapter.path).name.replace('.', '_')}.onnx_adapter"
                    write_onnx_adapter(temp / name, _adapter_parameters(adapter, modules, np_dtype))
                    adapter_files.append(name)
            diffs = None
            if validate and not with_past:
                diffs = max_diff_against_torch(session(temp / "model.onnx"), model, lora)
                if max(diffs) > atol:
                    raise ValidationError(
                        f"the ONNX graph differs from the PyTorch model by up to {max(diffs):.3g} (shapes "
                        f"{' and '.join(map(str, VALIDATION_SHAPES))}), above --atol {atol:g}; nothing was written. "
                        "Try --dtype float32, or raise --atol if the difference is acceptable"
                    )
            elif validate:
                diffs = _validate_with_past(temp / "model.onnx", model, atol)
            for companion in COMPANION_FILES:
                if (model_dir / companion).is_file() and not (temp / companion).exists():
                    copy_regular_file(model_dir / companion, temp / companion)
            opset = _opset_of(temp / "model.onnx")
            facts = {"model_type": config["model_type"], "task": task, "opset": opset, "dtype": dtype,
                     "with_past": with_past, "inputs": graph_inputs, "validation_max_abs_diff": diffs,
                     "atol": atol, "adapters": [str(a) for a in adapters], "weights": list(weights or []),
                     "adapter_inputs": adapter_inputs, "adapter_files": adapter_files}
            (temp / FACTS_NAME).write_text(json.dumps(facts, indent=2) + "\n")
    return ExportResult(output, config["model_type"], graph_inputs, opset, diffs, [str(a) for a in adapters],
                        adapter_files, time.perf_counter() - started, notes)


def _opset_of(onnx_path: Path) -> int | None:
    """The default-domain opset the exporter actually used."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _lora_modules(adapters: list[Adapter]) -> list[str]:
    if not adapters:
        raise UsageError("--adapter-inputs needs at least one --adapter to know which layers take LoRA inputs")
    bad = [f"{a.path}: {n}" for a in adapters for n, m in a.modules.items() if m.kind is not LayerKind.LINEAR or m.is_dora]
    if bad:
        raise UsageError(f"--adapter-inputs supports plain LoRA on linear layers; not: {', '.join(bad[:5])}")
    return sorted({n for a in adapters for n in a.modules})


def _validate_with_past(onnx_path: Path, model, atol: float) -> list[float]:
    """Greedy-generate 8 tokens with onnxruntime and the KV cache (from an empty cache), check that the
    tokens equal PyTorch's greedy `generate`, and compare every step's logits with one PyTorch forward
    over the whole sequence."""
    from ..export.runtime import greedy_generate

    ort_session = session(onnx_path)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    steps: list[np.ndarray] = []
    tokens = greedy_generate(ort_session, model.config, prompt.numpy(), 8, steps)
    with torch.no_grad():
        reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                   use_cache=True)
        logits = model(input_ids=torch.from_numpy(tokens[:, :-1]), use_cache=False).logits.float().numpy()
    diff = float(np.abs(np.concatenate(steps, axis=1).astype(np.float32) - logits).max())
    if not np.array_equal(tokens, reference.numpy()) or diff > atol:
        raise ValidationError(
            f"generation with the exported KV cache differs from PyTorch (max |logit diff| {diff:.3g}, --atol "
            f"{atol:g}); nothing was written"
        )
    return [diff]
