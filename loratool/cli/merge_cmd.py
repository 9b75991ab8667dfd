"""`loratool merge`."""

from __future__ import annotations

import click

from ..distributed.progress import task_progress
from ..dtypes import MERGE_DTYPE_CHOICES
from .params import (LocationType, SizeType, WeightListType, adapter_format_options, allow_pickle_option, device_option,
                     force_option, json_option, scale_out_options)


@click.command("merge")
@click.argument("base", type=LocationType("model"))
@click.argument("adapters", nargs=-1, required=True, type=LocationType("adapter"))
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Where to write. Default: BASE+ADAPTER… in the current directory (never overwriting; the path is "
                   "printed). Must not be an input.")
@click.option("--weights", type=WeightListType(), default=None,
              help="One weight per adapter, comma-separated: W' = W + Σ wᵢ·ΔWᵢ. A negative weight subtracts, "
                   "so --weights -1 unmerges. Default: 1 each.")
@click.option("--dtype", type=click.Choice(MERGE_DTYPE_CHOICES), default="auto", show_default=True,
              help="auto keeps each tensor's own dtype and encoding: FP8 and GGUF tensors that change are "
                   "requantized in their own format, with a report of what rounding cost. float32/bfloat16/float16 "
                   "write every float tensor in that dtype, dequantized. float8_e4m3fn also quantizes a .safetensors "
                   "base's linear weights into ComfyUI's scaled FP8; q8_0 converts a .gguf base's tensors to Q8_0.")
@click.option("--max-shard-size", type=SizeType(), default=None,
              help="Re-shard a folder output into files of at most this size (e.g. 5GB, 500MB). "
                   "Default: keep the base's own shard layout.")
@device_option
@force_option
@click.option("--allow-nonfinite", is_flag=True, help="Merge even when adapters or results hold NaN/Inf.")
@click.option("--skip-missing", is_flag=True,
              help="Merge the modules the base has and skip the ones it lacks (e.g. a Wan I2V LoRA's k_img/v_img "
                   "on a T2V base), reporting how many. Default: refuse such an adapter.")
@allow_pickle_option
@adapter_format_options
@scale_out_options
@json_option
@click.pass_obj
def merge_cmd(out, base, adapters, output, weights, dtype, max_shard_size, device, force, allow_nonfinite,
              skip_missing, allow_pickle, adapter_format, alpha, ray, gpus_per_task, as_json):
    """Fold one or more ADAPTERS into BASE and write a plain model to OUTPUT.

    BASE is a .safetensors file (an LLM, or a single-file SD1/SD2/SDXL/Flux checkpoint), a sharded
    index.json, a model folder or a diffusers pipeline folder; OUTPUT mirrors it (file -> file, folder
    -> folder, with config, tokenizer and untouched component files copied). ADAPTERS may be PEFT,
    kohya, LyCORIS or diffusers files naming modules in LDM, diffusers or BFL terms. Tensors stream one
    at a time, so memory stays at about one tensor whatever the model size. ΔW is computed in float32
    and rounded to the output dtype once.

    BASE may also be quantized: ComfyUI's FP8 files (scaled_fp8 / comfy_quant), HF FP8 block-scaled
    folders (DeepSeek-V3, Qwen3-FP8) or a .gguf file. Changed tensors are requantized in the base's own
    encoding with fresh scales, and a summary says how much of each update survived the rounding
    (docs/quantized.md).

    \b
    Examples:
      loratool merge sd_xl_base_1.0.safetensors my_lora.safetensors
      loratool merge base/ adapter/ -o merged/
      loratool merge base/ style/ subject/ --weights 0.7,1 -o merged/
      loratool merge wan2.1_t2v_14B_fp8_scaled.safetensors lightx2v_lora.safetensors
      loratool merge merged/ adapter/ --weights -1 -o restored/
    """
    from ..api.merge import merge

    with task_progress(out, "merging", ray) as advance:
        result = merge(base, list(adapters), output, weights=weights, dtype=dtype, max_shard_bytes=max_shard_size,
                       device=device, force=force, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
                       progress=advance, adapter_format=adapter_format, alpha=alpha, skip_missing=skip_missing,
                       ray=ray, gpus_per_task=gpus_per_task)
    if out.notes_then_json(result, as_json):
        return
    out.print(
        f"[green]merged[/] {len(result.adapters)} adapter(s) into {result.output}: "
        f"{result.tensors_changed}/{result.tensors} tensors changed, {result.bytes_written / 1e6:,.1f} MB in "
        f"{len(result.files)} file(s), {result.seconds:.2f}s"
    )
