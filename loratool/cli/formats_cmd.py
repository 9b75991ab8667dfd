"""`loratool convert` and `loratool extract`."""

from __future__ import annotations

import click

from ..dtypes import OUTPUT_DTYPE_CHOICES
from .params import (CONVERT_TARGETS, EMBEDDED, GGUF_DTYPES, LocationType, adapter_format_options,
                     allow_pickle_option, base_option, force_option, json_option, output_option, rank_options)

#: How many of the largest per-module errors `convert --rank` prints (all of them are in --json).
WORST_SHOWN = 3


@click.command("convert")
@click.argument("adapter", type=LocationType("adapter"))
@output_option
@click.option("--to", "to", required=True, type=click.Choice(CONVERT_TARGETS),
              help="Format to write; gguf is a llama.cpp --lora file and needs --base (the HF model folder).")
@base_option
@adapter_format_options
@click.option("--component", default=None,
              help="Pipeline component: with --to diffusers, the prefix for modules that have none (default unet); "
                   "with --to peft, which component of a pipeline adapter to keep.")
@rank_options
@click.option("--dtype", type=click.Choice(tuple(dict.fromkeys((*OUTPUT_DTYPE_CHOICES, *GGUF_DTYPES)))),
              default="auto", show_default=True,
              help="Output dtype; auto keeps each tensor's own. q8_0 is for --to gguf only (rows that are not a "
                   "multiple of 32 values fall back to f16, and are named).")
@force_option
@allow_pickle_option
@json_option
@click.pass_obj
def convert_cmd(out, adapter, output, to, base, adapter_format, alpha, component, rank, energy, max_rank, dtype, force,
                allow_pickle, as_json):
    """Convert ADAPTER between PEFT, kohya (sd-scripts) and diffusers, losslessly, or to GGUF for llama.cpp.

    Per-module rank and alpha are kept (rank_pattern/alpha_pattern in PEFT, .alpha tensors in kohya,
    the lora_adapter_metadata JSON in diffusers); rsLoRA is folded into alpha where the target has no
    flag, so every scale is unchanged. What a target cannot hold (DoRA or embeddings in kohya, whole
    tensors in kohya or diffusers) is refused with the reason. Reading kohya needs --base: its module
    names replace '.' with '_', and only the base's module list maps them back.

    LyCORIS modules (LoHa, LoKr, LoCon, full diffs) convert as they are to kohya, and all-LoHa or
    all-LoKr adapters to a PEFT LoHa/LoKr folder. --rank R (or --energy E) turns every module into a
    plain LoRA by truncated SVD of its ΔW instead, for targets that hold LoRA only, and reports each
    module's relative error. See docs/lycoris.md.

    --to gguf writes the file llama.cpp loads with --lora: tensor names from the gguf package's map
    for the base's architecture, PEFT's exact per-module scale (rsLoRA, alpha_pattern) folded into
    lora_b, and llama-arch q/k rows reordered like the base GGUF's. It needs the gguf extra.

    \b
    Examples:
      loratool convert adapter/ --to kohya -o lora.safetensors
      loratool convert lora.safetensors --to peft --base base/ -o adapter/
      loratool convert adapter/ --to diffusers --component unet -o pytorch_lora_weights.safetensors
      loratool convert loha.safetensors --to peft --base sd15/ -o loha-peft/
      loratool convert loha.safetensors --to diffusers --rank 16 --base sd15/ -o lora.safetensors
      loratool convert adapter/ --to gguf --base base/ -o adapter.gguf --dtype float16
    """
    from ..api.convert import convert

    result = convert(adapter, output, to, base=base, format=adapter_format, alpha=alpha, component=component,
                     dtype=dtype, force=force, allow_pickle=allow_pickle, rank=rank, energy=energy,
                     max_rank=max_rank)
    if out.notes_then_json(result, as_json):
        return
    if result.errors is not None:
        worst = sorted(result.errors.items(), key=lambda item: -item[1])[:WORST_SHOWN]
        out.print(f"as plain LoRA: max relative error {result.max_error:.2e}; worst: "
                  + ", ".join(f"{name} {error:.2e}" for name, error in worst))
    out.print(f"[green]converted[/] {result.modules} modules from {result.source_format} to {result.target_format}: "
              f"{result.output}")


@click.command("extract")
@click.argument("checkpoint", type=click.Path())
@output_option
@click.option("--base-out", type=click.Path(), default=None,
              help="Also write the clean base model here: LoRA tensors dropped, base_layer names restored, and "
                   "loralib weights unmerged when ΔW had been merged into them.")
@click.option("--format", "adapter_format", type=click.Choice(EMBEDDED), default=None,
              help="Checkpoint dialect; detected when not given.")
@click.option("--alpha", type=float, default=None, help="lora_alpha (loralib does not store it).")
@click.option("--already-merged/--not-merged", default=None,
              help="Whether a loralib checkpoint was saved after eval() merged ΔW into the weights. Default: "
                   "detect it with --base, else assume not merged (with a warning).")
@base_option
@force_option
@allow_pickle_option
@json_option
@click.pass_obj
def extract_cmd(out, checkpoint, output, base_out, adapter_format, alpha, already_merged, base, force, allow_pickle,
                as_json):
    """Pull the LoRA out of a fine-tuned CHECKPOINT that still holds it, into a PEFT adapter.

    CHECKPOINT is a whole model state dict from loralib (microsoft/LoRA: <module>.lora_A/lora_B beside
    <module>.weight) or from a PEFT-wrapped model (<module>.base_layer.weight, lora_A.default...). r,
    alpha, targets and patterns are inferred; DoRA magnitudes and modules_to_save come along. Both
    outputs stream one tensor at a time.

    \b
    Examples:
      loratool extract trained.safetensors --alpha 16 -o adapter/ --base-out base/
      loratool extract peft_state.safetensors -o adapter/
    """
    from ..api.extract import extract

    result = extract(checkpoint, output, base_output=base_out, format=adapter_format, alpha=alpha,
                     already_merged=already_merged, base=base, force=force, allow_pickle=allow_pickle)
    if out.notes_then_json(result, as_json):
        return
    base_text = f" and the clean base to {result.base_output}" if result.base_output else ""
    out.print(f"[green]extracted[/] {result.modules} modules (rank {', '.join(map(str, result.ranks))}) from a "
              f"{result.source_format} checkpoint to {result.output}{base_text}")
