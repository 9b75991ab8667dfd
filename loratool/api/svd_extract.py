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
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.output import atomic_output, check_output_path
from ..checkpoint.pipeline import ReadAhead
from ..checkpoint.writer import LazyTensor
from ..distributed.options import ScaleOut
from ..distributed.runner import ClusterReport
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
#: What a tensor pair that is not a factorised target turned out to be.
UNCHANGED, CHANGED = "unchanged", "changed"


@dataclass(frozen=True)
class Extracted:
    """One factorised target: its LoRA module and report; `capped` when --rank exceeded min(out, in)."""

    module: LoraModule
    report: ModuleReport
    capped: bool


#: A tensor pair's outcome: Extracted, UNCHANGED or CHANGED (changed, but not factorised).
Outcome = Extracted | str


@dataclass
class LowRankOnCluster(LowRankResult):
    """A low-rank result computed on a Ray cluster: `cluster` says where its tasks ran."""

    cluster: ClusterReport | None = None

    def to_json(self) -> dict:
        return {**super().to_json(), "cluster": self.cluster.to_json() if self.cluster else None}


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
    seed: int = 0,
    ray: str | None = None,
    gpus_per_task: float | None = None,
) -> LowRankResult:
    """Write a PEFT adapter whose B@A approximates FINETUNED − BASE at `rank` (or by `energy`).

    With `ray` (an address: auto, local, ray://HOST:PORT), balanced groups of tensor pairs are factorised
    by Ray tasks on the cluster's nodes, which read BASE and FINETUNED from the same paths; the driver
    writes the adapter. Each tensor's randomized SVD is seeded from `seed` and its name, so a tensor's
    factors do not depend on which task computed it.
    """
    started = time.perf_counter()
    scale = ScaleOut.parse(ray, device, gpus_per_task)
    rule = RankRule(rank, energy, max_rank, seed)
    output = Path(output)
    out_dtype = parse_output_dtype(dtype)
    torch_device = resolve_device(device) if scale is None else None
    with open_checkpoint(base, allow_pickle=allow_pickle) as base_ckpt, \
            open_checkpoint(finetuned, allow_pickle=allow_pickle) as ft_ckpt:
        check_output_path(output, [Path(base), Path(finetuned)], force)
        if output.suffix == ".safetensors":
            raise UsageError(f"OUT is an adapter folder (adapter_config.json + adapter_model.safetensors), got {output}")
        _check_pairing(base_ckpt, ft_ckpt)
        planned = plan_targets(base_ckpt, targets, exclude)
        extraction = _Extraction(base_ckpt, ft_ckpt, planned, rule, exact, torch_device, out_dtype, keep_full)
        cluster = None
        if scale is None:
            extraction.run(progress)
        else:
            cluster = extraction.run_on_cluster(scale, [Path(base), Path(finetuned)], allow_pickle, progress)
        config = extraction.adapter_config(_module_candidates(base_ckpt))
        with atomic_output(output, is_folder=True) as temp:
            files = write_peft_adapter(temp, extraction.modules, extraction.kept, config, None)
            adapter_bytes = sum(f.stat().st_size for f in files)
        source_bytes = ft_ckpt.total_bytes
    return (LowRankResult if cluster is None else partial(LowRankOnCluster, cluster=cluster))(
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

    def order(self) -> list[str]:
        """Every tensor name, in the order the files hold them."""
        return sorted(self.finetuned, key=lambda n: (str(self.finetuned[n].path), self.finetuned[n].data_start))

    def outcomes(self, names: list[str]) -> Iterator[tuple[str, Outcome]]:
        """Each pair's outcome, in the order of `names`; the next pair is read during this one's SVD."""
        prefetch = ReadAhead(self._read_pair, names, depth=0)
        try:
            for name in names:
                before, after = prefetch.get()
                if name in self.planned:
                    yield name, self._extract(self.planned[name], before, after) or UNCHANGED
                else:
                    yield name, UNCHANGED if torch.equal(before, after) else CHANGED
        finally:
            prefetch.close()

    def absorb(self, name: str, outcome: Outcome) -> None:
        if outcome == UNCHANGED:
            self.unchanged += 1
        elif outcome == CHANGED:
            self.changed_other.append(name)
        else:
            self.modules[outcome.module.name] = outcome.module
            self.reports.append(outcome.report)
            if outcome.capped:
                self._capped.append(outcome.module.name)

    def run(self, progress: ProgressCallback | None) -> None:
        order = self.order()
        total = sum(self.finetuned[n].nbytes for n in order)
        for name, outcome in self.outcomes(order):
            self.absorb(name, outcome)
            if progress:
                progress(self.finetuned[name].nbytes, total)
        self.finish()

    def run_on_cluster(self, scale: ScaleOut, inputs: list[Path], allow_pickle: bool,
                       progress: ProgressCallback | None) -> ClusterReport:
        """`run`, with the pairs factorised by Ray tasks (balanced groups by bytes); the outcomes are
        taken in file order, as `run` takes them, so the adapter does not depend on the grouping."""
        from ..distributed.runner import run_grouped

        order = self.order()
        outcomes, report = run_grouped(
            scale, extract_group, order, [self.finetuned[n].nbytes for n in order],
            ([str(p) for p in inputs], allow_pickle, self.planned, self.rule, self.exact, self.out_dtype),
            progress, inputs)
        for name, outcome in zip(order, outcomes):
            self.absorb(name, outcome)
        self.finish()
        return report

    def finish(self) -> None:
        """After every pair: refuse an empty result, settle the tensors kept whole, note capped ranks."""
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

    def _extract(self, target: Target, before: torch.Tensor, after: torch.Tensor) -> Extracted | None:
        """Factorise one ΔW; None when it is zero."""
        delta = after.to(self.device, COMPUTE_DTYPE, copy=True).sub_(before.to(self.device))
        norm = float(torch.linalg.vector_norm(delta))
        if norm == 0:
            return None
        # NaN/Inf anywhere makes the norm non-finite; recheck elementwise only then (it may be an overflow).
        if not math.isfinite(norm) and not torch.isfinite(delta).all():
            raise NonFiniteError(f"{target.tensor}: the difference FINETUNED − BASE holds NaN/Inf")
        matrix = target.matrix(delta)
        capped = self.rule.rank is not None and self.rule.rank > min(matrix.shape)
        U, S, Vh = self.rule.for_tensor(target.tensor).factorize(matrix, self.exact)
        dtype = _factor_dtype(self.out_dtype, self.finetuned[target.tensor].torch_dtype)
        B, A = (f.to(dtype) for f in split_factors(U, S, Vh))
        error = relative_error(matrix, B.to(COMPUTE_DTYPE), A.to(COMPUTE_DTYPE), norm)
        module = LoraModule.from_factors(target.module, target.kind, tuple(delta.shape), B, A)
        return Extracted(module, ModuleReport(
            name=target.module, kind=target.kind.value, shape=list(delta.shape), rank=A.shape[0],
            energy=energy_of(error), relative_error=error, delta_norm=norm,
        ), capped)

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


def extract_group(names: list[str], device: str, inputs: list[str], allow_pickle: bool, planned: dict[str, Target],
                  rule: RankRule, exact: bool, out_dtype: torch.dtype | None) -> list[Outcome]:
    """One Ray task's share of `svd_extract`: the outcomes of the pairs `names`, read from BASE and
    FINETUNED (`inputs`) on this node."""
    from ..distributed.inputs import on_this_node

    inputs = [on_this_node(path) for path in inputs]
    with open_checkpoint(inputs[0], allow_pickle=allow_pickle) as base, \
            open_checkpoint(inputs[1], allow_pickle=allow_pickle) as finetuned:
        extraction = _Extraction(base, finetuned, planned, rule, exact, torch.device(device), out_dtype, False)
        return [outcome for _, outcome in extraction.outcomes(names)]
