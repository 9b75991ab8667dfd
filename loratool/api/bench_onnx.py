"""`bench-onnx`: latency of the base, merged and unmerged-LoRA ONNX graphs, and PyTorch eager, timed
interleaved in one process so that drift (thermal, other load) hits every variant alike, with the
order shuffled every round so that no variant always runs in the same position, and onnxruntime's
worker threads told not to spin between runs."""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..export.graph import load_model, model_config, require_onnx_stack
from ..export.runtime import providers, run_options_with, session
from .export_onnx import export_onnx
from .merge import merge


@dataclass
class BenchResult:
    model_dir: Path
    adapter: str
    batch: int
    sequence: int
    provider: str
    repeats: int
    median_ms: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def ratios(self) -> dict[str, float]:
        m = self.median_ms
        return {"merged/base": m["onnx merged"] / m["onnx base"], "unmerged/base": m["onnx unmerged LoRA"] / m["onnx base"],
                "torch merged/onnx merged": m["torch eager merged"] / m["onnx merged"]}

    def to_json(self) -> dict:
        return {"model_dir": str(self.model_dir), "adapter": self.adapter, "batch": self.batch,
                "sequence": self.sequence, "provider": self.provider, "repeats": self.repeats,
                "median_ms": {k: round(v, 3) for k, v in self.median_ms.items()},
                "ratios": {k: round(v, 4) for k, v in self.ratios.items()}, "notes": self.notes}


def bench_onnx(model_dir: str | os.PathLike, adapter: str | os.PathLike, batch: int = 1, sequence: int = 128,
               provider: str = "auto", repeats: int = 30, warmup: int = 3, work: str | os.PathLike | None = None,
               progress=None) -> BenchResult:
    """Export the three graphs (reusing them from `work` when present), then time them and PyTorch."""
    require_onnx_stack()
    model_dir = Path(model_dir)
    model_config(model_dir)
    if batch <= 0 or sequence <= 0 or repeats <= 0:
        raise UsageError("--batch, --seq and --repeats must be positive")
    names, note = providers(provider)
    notes = [note] if note else []
    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as scratch:
        root = Path(work) if work is not None else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        # One merge serves both the merged graph and the PyTorch reference.
        merged_checkpoint = root / "merged-checkpoint"
        if not (merged_checkpoint / "config.json").is_file():
            merge(model_dir, [adapter], merged_checkpoint, force=True)
        exports = {
            "onnx base": (model_dir, root / "base", {}),
            "onnx merged": (merged_checkpoint, root / "merged", {}),
            "onnx unmerged LoRA": (model_dir, root / "unmerged", {"adapters": [adapter], "adapter_inputs": True}),
        }
        for label, (source, folder, options) in exports.items():
            if not (folder / "model.onnx").is_file():
                if progress:
                    progress(f"exporting {label}")
                export_onnx(source, folder, validate=False, force=True, **options)
        adapter_file = next((root / "unmerged").glob("*.onnx_adapter"))
        vocab = model_config(model_dir).get("vocab_size", 100)
        ids = torch.randint(0, vocab, (batch, sequence), generator=torch.Generator().manual_seed(0))
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, sequence), dtype=np.int64)}
        sessions = {label: session(folder / "model.onnx", provider, spinning=False)
                    for label, (_, folder, _) in exports.items()}
        unmerged_options, loaded_adapter = run_options_with(adapter_file)
        model = load_model(merged_checkpoint, torch.float32)
        runs = {
            "onnx base": lambda: sessions["onnx base"].run(["logits"], feeds),
            "onnx merged": lambda: sessions["onnx merged"].run(["logits"], feeds),
            "onnx unmerged LoRA": lambda: sessions["onnx unmerged LoRA"].run(["logits"], feeds,
                                                                             run_options=unmerged_options),
            "torch eager merged": lambda: _torch_forward(model, ids),
        }
        timings: dict[str, list[float]] = {label: [] for label in runs}
        with torch.inference_mode():
            order = random.Random(0)
            for round_index in range(warmup + repeats):
                # A fresh order each round, so no variant always follows the same one (caches, clocks).
                labels = list(runs)
                order.shuffle(labels)
                for label in labels:
                    run = runs[label]
                    started = time.perf_counter()
                    run()
                    if round_index >= warmup:
                        timings[label].append((time.perf_counter() - started) * 1000)
                if progress:
                    progress(f"round {round_index + 1}/{warmup + repeats}")
        del loaded_adapter
    medians = {label: statistics.median(values) for label, values in timings.items()}
    return BenchResult(model_dir, str(adapter), batch, sequence, names[0], repeats, medians, notes)


def _torch_forward(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
