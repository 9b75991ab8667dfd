"""`svd-extract`: a full fine-tune's ΔW = W_ft − W_base as a PEFT LoRA adapter at a chosen rank.

Both checkpoints stream pairwise, one tensor at a time. Each targeted ΔW is factorised by
randomized (default) or exact SVD in float32, split √S/√S into B and A with alpha = r (scale 1), and
its error is measured on the factors as written. Only the factors stay in memory; tensors kept whole
(`--keep-full`) are re-read from FINETUNED while the adapter file is written.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.output import atomic_output, check_output_path
from ..checkpoint.pipeline import ReadAhead
from ..checkpoint.writer import LazyTensor
from ..dtypes import MERGEABLE_FLOATS, parse_output_dtype
from ..errors import MismatchError, NonFiniteError, UsageError, summarize
from ..formats.peft import task_type_for, write_peft_adapter
from ..lora.delta import COMPUTE_DTYPE
from ..lora.kinds import LayerKind
from ..lora.algorithms import LoraModule
from ..lora.svd import RankRule, energy_of, relative_error, split_factors
from ..lora.targeting import CONV1D_MODEL_TYPES, EMBEDDING_LEAVES, OUTPUT_HEAD_LEAVES, compact_target_modules, leaf
from ..options import resolve_device
from .merge import ProgressCallback
from .report import FullTensorReport, LowRankResult, ModuleReport

WEIGHT_SUFFIX = ".weight"


@dataclass(frozen=True)
class Target:
    """A weight to low-rank: its module, layer kind and how ΔW is turned into PEFT's (out, in) matrix
    (whose factors `LoraModule.from_factors` takes)."""

    tensor: str
    module: str
    kind: LayerKind
    transposed: bool  # HF Conv1D linears and embeddings: PEFT's B@A is ΔWᵀ

    def matrix(self, delta: torch.Tensor) -> torch.Tensor:
        if self.kind is LayerKind.CONV:
            return delta.reshape(delta.shape[0], -1)
        return delta.T if self.transposed else delta


def _compile(pattern: str | None, option: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{option} {pattern!r} is not a valid regular expression: {e}") from e


def _check_pairing(base: Checkpoint, finetuned: Checkpoint) -> None:
    only_base = sorted(set(base) - set(finetuned))
    only_ft = sorted(set(finetuned) - set(base))
    shapes = [f"{n} {list(base[n].shape)} vs {list(finetuned[n].shape)}"
              for n in sorted(set(base) & set(finetuned)) if base[n].shape != finetuned[n].shape]
    problems = []
    if only_base:
        problems.append(f"only in BASE: {summarize(only_base)}")
    if only_ft:
        problems.append(f"only in FINETUNED: {summarize(only_ft)}")
    if shapes:
        problems.append(f"shapes differ: {summarize(shapes)}")
    if problems:
        raise MismatchError("BASE and FINETUNED do not hold the same tensors; " + "; ".join(problems))


def plan_targets(checkpoint: Checkpoint, targets: str | None, exclude: str | None) -> dict[str, Target]:
    """Tensor name -> Target for every weight that may be low-ranked (whether it changed is seen later).

    Default: every 2-D linear weight and every Conv2d kernel, not embeddings or the output head. With
    `targets`, modules whose name the regex finds; embeddings among them become PEFT embedding LoRA.
    """
    include, leave_out = _compile(targets, "--targets"), _compile(exclude, "--exclude")
    model_type = (checkpoint.config() or {}).get("model_type")
    conv1d = model_type in CONV1D_MODEL_TYPES
    planned: dict[str, Target] = {}
    for name, info in checkpoint.items():
        if not name.endswith(WEIGHT_SUFFIX) or len(info.shape) not in (2, 4) or info.torch_dtype not in MERGEABLE_FLOATS:
            continue
        module = name[: -len(WEIGHT_SUFFIX)]
        special = leaf(module) in EMBEDDING_LEAVES | OUTPUT_HEAD_LEAVES
        chosen = include.search(module) is not None if include else not special
        if not chosen or (leave_out and leave_out.search(module)):
            continue
        if len(info.shape) == 4:
            planned[name] = Target(name, module, LayerKind.CONV, False)
        elif leaf(module) in EMBEDDING_LEAVES:
            planned[name] = Target(name, module, LayerKind.EMBEDDING, True)
        else:
            planned[name] = Target(name, module, LayerKind.LINEAR, conv1d)
    return planned


def _module_candidates(checkpoint: Checkpoint) -> list[str]:
    return [n[: -len(WEIGHT_SUFFIX)] for n, i in checkpoint.items() if n.endswith(WEIGHT_SUFFIX) and len(i.shape) in (2, 4)]


def _factor_dtype(out_dtype: torch.dtype | None, source: torch.dtype) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return source if source in MERGEABLE_FLOATS else torch.float32


def svd_extract(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    targets: str | None = None,
    exclude: str | None = None,
    exact: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    keep_full: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> LowRankResult:
    """Write a PEFT adapter whose B@A approximates FINETUNED − BASE at `rank` (or by `energy`)."""
    started = time.perf_counter()
    rule = RankRule(rank, energy, max_rank)
    output = Path(output)
    out_dtype = parse_output_dtype(dtype)
    torch_device = resolve_device(device)
    with open_checkpoint(base, allow_pickle=allow_pickle) as base_ckpt, \
            open_checkpoint(finetuned, allow_pickle=allow_pickle) as ft_ckpt:
        check_output_path(output, [Path(base), Path(finetuned)], force)
        if output.suffix == ".safetensors":
            raise UsageError(f"OUT is an adapter folder (adapter_config.json + adapter_model.safetensors), got {output}")
        _check_pairing(base_ckpt, ft_ckpt)
        planned = plan_targets(base_ckpt, targets, exclude)
        extraction = _Extraction(base_ckpt, ft_ckpt, planned, rule, exact, torch_device, out_dtype, keep_full)
        extraction.run(progress)
        config = extraction.adapter_config(_module_candidates(base_ckpt))
        with atomic_output(output, is_folder=True) as temp:
            files = write_peft_adapter(temp, extraction.modules, extraction.kept, config, None)
            adapter_bytes = sum(f.stat().st_size for f in files)
        source_bytes = ft_ckpt.total_bytes
    return LowRankResult(
        output=output,
        method="exact" if exact else "randomized",
        modules=extraction.reports,
        full_tensors=extraction.full_reports,
        unchanged=extraction.unchanged,
        parameters=extraction.parameters,
        adapter_bytes=adapter_bytes,
        source_bytes=source_bytes,
        seconds=time.perf_counter() - started,
        notes=extraction.notes,
    )


class _Extraction:
    """The streaming pass over tensor pairs; collects factors, reports and the tensors to keep whole."""

    def __init__(self, base: Checkpoint, finetuned: Checkpoint, planned: dict[str, Target], rule: RankRule,
                 exact: bool, device: torch.device, out_dtype: torch.dtype | None, keep_full: bool):
        self.base, self.finetuned, self.planned = base, finetuned, planned
        self.rule, self.exact, self.device, self.out_dtype, self.keep_full = rule, exact, device, out_dtype, keep_full
        self.modules: dict[str, LoraModule] = {}
        self.reports: list[ModuleReport] = []
        self.changed_other: list[str] = []
        self.kept: dict[str, LazyTensor] = {}
        self.full_reports: list[FullTensorReport] = []
        self.unchanged = 0
        self.notes: list[str] = []
        self._capped: list[str] = []
        self._keeps_target_bias = False
        self._modules_to_save: set[str] = set()

    def _read_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.read(name), self.finetuned.read(name)

    def run(self, progress: ProgressCallback | None) -> None:
        order = sorted(self.finetuned, key=lambda n: (str(self.finetuned[n].path), self.finetuned[n].data_start))
        total = sum(self.finetuned[n].nbytes for n in order)
        prefetch = ReadAhead(self._read_pair, order, depth=0)  # the next pair is read during this one's SVD
        try:
            for name in order:
                before, after = prefetch.get()
                if name in self.planned:
                    if not self._extract(self.planned[name], before, after):
                        self.unchanged += 1
                elif torch.equal(before, after):
                    self.unchanged += 1
                else:
                    self.changed_other.append(name)
                if progress:
                    progress(self.finetuned[name].nbytes, total)
        finally:
            prefetch.close()
        if not self.modules:
            if not self.changed_other:
                raise UsageError("BASE and FINETUNED hold identical weights; there is no difference to extract")
            raise UsageError(
                f"none of the changed tensors is a low-rank target ({summarize(self.changed_other)} changed); "
                "choose modules with --targets, or check --exclude"
            )
        self._settle_full_tensors()
        if self._capped:
            self.notes.append(f"rank capped at min(out, in) for {summarize(self._capped)}")

    def _extract(self, target: Target, before: torch.Tensor, after: torch.Tensor) -> bool:
        """Factorise one ΔW; False when it is zero."""
        delta = after.to(self.device, COMPUTE_DTYPE, copy=True).sub_(before.to(self.device))
        norm = float(torch.linalg.vector_norm(delta))
        if norm == 0:
            return False
        # NaN/Inf anywhere makes the norm non-finite; recheck elementwise only then (it may be an overflow).
        if not math.isfinite(norm) and not torch.isfinite(delta).all():
            raise NonFiniteError(f"{target.tensor}: the difference FINETUNED − BASE holds NaN/Inf")
        matrix = target.matrix(delta)
        if self.rule.rank is not None and self.rule.rank > min(matrix.shape):
            self._capped.append(target.module)
        U, S, Vh = self.rule.factorize(matrix, self.exact)
        dtype = _factor_dtype(self.out_dtype, self.finetuned[target.tensor].torch_dtype)
        B, A = (f.to(dtype) for f in split_factors(U, S, Vh))
        error = relative_error(matrix, B.to(COMPUTE_DTYPE), A.to(COMPUTE_DTYPE), norm)
        rank = A.shape[0]
        self.modules[target.module] = LoraModule.from_factors(target.module, target.kind, tuple(delta.shape), B, A)
        self.reports.append(ModuleReport(
            name=target.module, kind=target.kind.value, shape=list(delta.shape), rank=rank,
            energy=energy_of(error), relative_error=error, delta_norm=norm,
        ))
        return True

    def _settle_full_tensors(self) -> None:
        """Keep (with --keep-full) or list every changed tensor that is not a low-rank target.

        The bias of a low-ranked module is saved as PEFT's `bias="lora_only"` saves it; any other changed
        tensor makes its whole module a `modules_to_save` entry.
        """
        dropped = []
        for name in sorted(self.changed_other):
            module, _, param = name.rpartition(".")
            if module in self.modules:
                savable, reason = param == "bias", "bias of a low-rank module"
            else:
                savable, reason = bool(module), "not a low-rank target"
            kept = self.keep_full and savable
            self.full_reports.append(FullTensorReport(name, kept, reason if savable else "cannot be saved by PEFT"))
            if not kept:
                dropped.append(name)
            elif module in self.modules:
                self._keeps_target_bias = True
                self.kept[name] = self._lazy(name)
            else:
                self._modules_to_save.add(module)
        for module in sorted(self._modules_to_save):
            for name in self.finetuned:
                if name.rpartition(".")[0] == module:
                    self.kept[name] = self._lazy(name)
        if dropped:
            advice = "; pass --keep-full to save them whole" if not self.keep_full else ""
            self.notes.append(f"the adapter does not reproduce these changed tensors: {summarize(dropped)}{advice}")

    def _lazy(self, name: str) -> LazyTensor:
        info = self.finetuned[name]
        dtype = self.out_dtype if self.out_dtype is not None and info.torch_dtype in MERGEABLE_FLOATS else info.torch_dtype
        return LazyTensor(dtype, tuple(info.shape), lambda: self.finetuned.read(name))

    @property
    def parameters(self) -> int:
        factors = sum(m.lora_A.numel() + m.lora_B.numel() for m in self.modules.values())
        return factors + sum(math.prod(t.shape) for t in self.kept.values())

    def adapter_config(self, candidates: list[str]) -> dict:
        model_config = self.base.config() or {}
        return {
            "base_model_name_or_path": model_config.get("_name_or_path") or None,
            "task_type": task_type_for(model_config),
            "target_modules": compact_target_modules(self.modules, candidates),
            "modules_to_save": sorted(self._modules_to_save) or None,
            "fan_in_fan_out": model_config.get("model_type") in CONV1D_MODEL_TYPES,
            "bias": "lora_only" if self._keeps_target_bias else "none",
        }
