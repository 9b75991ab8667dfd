"""`loratool combine`."""

from __future__ import annotations

import click

from ..distributed.progress import task_progress
from ..units import format_bytes
from .params import (METHODS, LocationType, WeightListType, adapter_format_options, allow_pickle_option,
                     base_option, device_option, dtype_option, force_option, json_option, output_option,
                     scale_out_options)

_METHOD_HELP = "\n".join(f"{m.name}: {m.summary}." for m in METHODS.values())


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=LocationType("adapter"))
@output_option
@click.option("--method", "-m", required=True, type=click.Choice(list(METHODS)),
              help="How to combine (see below).")
@click.option("--weights", type=WeightListType(), default=None,
              help="One weight per adapter, comma-separated (default 1 each). Negative subtracts.")
@click.option("--rank", "-r", type=int, default=None,
              help="Output rank for svd, linear and the pruning methods (default: the largest input rank "
                   "per module). cat is always exact.")
@click.option("--density", type=float, default=None,
              help="Fraction of each ΔW's entries to keep, for ties, dare_* and magnitude_prune (required there).")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="TIES sign election: by summed values (total) or by count of signs (frequency).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for DARE's random pruning and the randomized SVD (per module, with its name).")
@device_option
@dtype_option
@force_option
@allow_pickle_option
@adapter_format_options
@base_option
@scale_out_options
@json_option
@click.pass_obj
def combine_cmd(out, adapters, output, method, weights, rank, density, majority_sign, seed, device, dtype, force,
                allow_pickle, adapter_format, alpha, base, ray, gpus_per_task, as_json):
    """Combine two or more ADAPTERS into one PEFT adapter, on their true deltas ΔWᵢ = sᵢ·Bᵢ·Aᵢ.

    Unlike PEFT's add_weighted_adapter and kohya's merge_lora.py, A and B are never mixed separately,
    so there are no cross terms Bᵢ·Aⱼ. cat and linear (without --rank) are exact; svd and
    linear --rank compress through QR of the stacked factors; the pruning methods build each
    module's full ΔW, prune, then compress it by randomized SVD. A module missing from an adapter
    counts as zero there. The output has scale 1 (lora_alpha = r) per module. LyCORIS modules (LoHa,
    LoKr, full diffs) have no LoRA factors: svd, linear --rank and the pruning methods take them on
    their dense ΔW (--rank required), cat and exact linear refuse them.

    \b
    Methods:
    {methods}

    \b
    Examples:
      loratool combine style/ subject/ --method cat -o both/
      loratool combine a/ b/ --method svd --weights 0.7,0.3 --rank 16 -o mixed/
      loratool combine a/ b/ c/ --method ties --density 0.5 -o ties/
    """
    from rich.table import Table

    from ..api.combine import combine

    with task_progress(out, "combining", ray) as advance:
        result = combine(list(adapters), output, method, weights=weights, rank=rank, density=density,
                         majority_sign=majority_sign, seed=seed, device=device, dtype=dtype, force=force,
                         allow_pickle=allow_pickle, adapter_format=adapter_format, alpha=alpha, base=base, ray=ray,
                         gpus_per_task=gpus_per_task, progress=advance if ray else None)
    if out.notes_then_json(result, as_json):
        return
    table = Table(title=f"combine --method {result.method}, weights {result.weights}", title_justify="left")
    table.add_column("module", overflow="fold")
    table.add_column("kind")
    table.add_column("ranks in", justify="right")
    table.add_column("rank out", justify="right")
    table.add_column("rel. error", justify="right")
    for m in result.modules:
        error = "exact" if m.relative_error is None else f"{m.relative_error:.2e}"
        table.add_row(m.name, m.kind, "+".join("-" if r is None else str(r) for r in m.ranks_in), str(m.rank), error)
    out.print(table)
    out.print(f"[green]wrote[/] {result.output}: {len(result.modules)} modules, {result.parameters:,} parameters, "
              f"{format_bytes(result.adapter_bytes)}, {result.seconds:.2f}s")


combine_cmd.help = combine_cmd.help.replace("{methods}", _METHOD_HELP.replace("\n", "\n    "))
