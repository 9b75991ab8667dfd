"""`loratool svd-extract` and `loratool resize`: both write a PEFT adapter and the same rank/error report."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..distributed.progress import task_progress
from ..units import format_bytes
from .params import (LocationType, adapter_format_options, allow_pickle_option, base_option, device_option, dtype_option,
                     force_option, json_option, output_option, rank_options, scale_out_options)


if TYPE_CHECKING:
    from ..api.report import LowRankResult
    from .output import Output


def seed_option(f):
    return click.option("--seed", type=int, default=0, show_default=True,
                        help="Seed of the randomized SVD; each tensor's is derived from it and the tensor's name.")(f)


def _report(out: Output, result: LowRankResult, verb: str, as_json: bool) -> None:
    if out.notes_then_json(result, as_json):
        return
    from rich.table import Table

    table = Table(title=f"{verb} ({result.method} SVD)", title_justify="left")
    for column, justify in (("module", "left"), ("kind", "left"), ("ΔW shape", "right"), ("rank", "right"),
                            ("energy kept", "right"), ("rel. error", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for m in result.modules:
        table.add_row(m.name, m.kind, "×".join(map(str, m.shape)), str(m.rank), f"{m.energy:.2%}",
                      f"{m.relative_error:.2e}")
    totals = result.to_json()["totals"]
    table.add_section()
    table.add_row(f"all {totals['modules']} modules", "", "", "", f"{totals['energy']:.2%}",
                  f"{totals['relative_error']:.2e}")
    out.print(table)
    for entry in result.full_tensors:
        state = "[green]kept whole[/]" if entry.kept else "[yellow]not reproduced[/]"
        out.print(f"{state} {entry.name} ({entry.reason})")
    out.print(
        f"[green]wrote[/] {result.output}: {result.parameters:,} parameters, {format_bytes(result.adapter_bytes)} "
        f"({result.compression:,.1f}× smaller than {format_bytes(result.source_bytes)}), {result.seconds:.2f}s"
    )


@click.command("svd-extract")
@click.argument("base", type=LocationType("model"))
@click.argument("finetuned", type=LocationType("model"))
@output_option
@rank_options
@click.option("--targets", default=None, metavar="REGEX",
              help="Low-rank only modules whose name this regex finds (re.search), embeddings and lm_head "
                   "included when it names them. Default: every 2-D linear weight and Conv2d kernel.")
@click.option("--exclude", default=None, metavar="REGEX", help="Leave out modules whose name this regex finds.")
@click.option("--exact", is_flag=True, help="Full SVD instead of randomized (slower, same result up to ~0.5%).")
@click.option("--keep-full", is_flag=True,
              help="Save changed tensors that cannot be low-ranked (norms, biases, untargeted weights) whole, "
                   "as modules_to_save.")
@device_option
@dtype_option
@force_option
@allow_pickle_option
@seed_option
@scale_out_options
@json_option
@click.pass_obj
def svd_extract_cmd(out, base, finetuned, output, rank, energy, max_rank, targets, exclude, exact, keep_full, device,
                    dtype, force, allow_pickle, seed, ray, gpus_per_task, as_json):
    """Turn a full fine-tune into a LoRA adapter: ΔW = FINETUNED − BASE, factorised at a chosen rank.

    BASE and FINETUNED are .safetensors files, sharded folders or index.json files holding the same
    tensors. They are read pairwise, one tensor at a time. Each ΔW is factorised by randomized SVD
    (--exact for a full one) as B = U√S, A = √S·Vᵀ with lora_alpha = r, so the LoRA scale is 1.
    OUTPUT is a PEFT adapter folder that PeftModel.from_pretrained loads onto BASE.

    \b
    Examples:
      loratool svd-extract base/ finetuned/ --rank 16 -o adapter/
      loratool svd-extract base/ finetuned/ --energy 0.9 --max-rank 64 -o adapter/
      loratool svd-extract base/ finetuned/ -r 8 --targets 'q_proj|v_proj' -o adapter/
      loratool svd-extract /shared/base/ /shared/ft/ -r 16 -o /shared/adapter/ --ray auto
    """
    from ..api.svd_extract import svd_extract

    with task_progress(out, "extracting", ray) as advance:
        result = svd_extract(base, finetuned, output, rank=rank, energy=energy, max_rank=max_rank, targets=targets,
                             exclude=exclude, exact=exact, device=device, dtype=dtype, keep_full=keep_full,
                             force=force, allow_pickle=allow_pickle, progress=advance, seed=seed, ray=ray,
                             gpus_per_task=gpus_per_task)
    _report(out, result, "svd-extract", as_json)


@click.command("resize")
@click.argument("adapter", type=LocationType("adapter"))
@output_option
@rank_options
@dtype_option
@force_option
@allow_pickle_option
@adapter_format_options
@base_option
@seed_option
@scale_out_options
@json_option
@click.pass_obj
def resize_cmd(out, adapter, output, rank, energy, max_rank, dtype, force, allow_pickle, adapter_format, alpha, base,
               seed, ray, gpus_per_task, as_json):
    """Re-rank ADAPTER to --rank R (or by --energy) and write it as a PEFT adapter.

    Works on the factors (QR of B and Aᵀ, then an SVD of the small r×r core), never on the full ΔW, so
    it takes milliseconds per module. Truncation is the best rank-R approximation of each module's ΔW;
    R at or above the current rank is exact. Output scale is 1 (lora_alpha = r, no rsLoRA). DoRA
    adapters are refused. LyCORIS modules (LoHa, LoKr, full diffs) become plain LoRA by a truncated
    SVD of their ΔW, so the output is always plain LoRA (LoHa/LoKr convs need --base).

    \b
    Examples:
      loratool resize adapter/ --rank 8 -o adapter-r8/
      loratool resize adapter/ --energy 0.95 -o adapter-small/
    """
    from ..api.resize import resize

    with task_progress(out, "resizing", ray) as advance:
        result = resize(adapter, output, rank=rank, energy=energy, max_rank=max_rank, dtype=dtype, force=force,
                        allow_pickle=allow_pickle, adapter_format=adapter_format, alpha=alpha, base=base, seed=seed,
                        ray=ray, gpus_per_task=gpus_per_task, progress=advance if ray else None)
    _report(out, result, "resize", as_json)
