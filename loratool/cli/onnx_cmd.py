"""`loratool export-onnx` and `loratool bench-onnx`."""

from __future__ import annotations

import click

from .params import (ONNX_DTYPES, ONNX_TASKS, LocationType, WeightListType, allow_pickle_option, force_option,
                     json_option, output_option)


@click.command("export-onnx")
@click.argument("model_dir", type=LocationType("model"))
@output_option
@click.option("--adapter", "adapters", multiple=True, type=LocationType("adapter"),
              help="Adapter to merge first (any format loratool reads); repeat for several.")
@click.option("--weights", type=WeightListType(), default=None, help="One weight per --adapter, as in merge.")
@click.option("--task", type=click.Choice(ONNX_TASKS), default="causal-lm", show_default=True)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the newest the exporter supports).")
@click.option("--dtype", type=click.Choice(list(ONNX_DTYPES)), default="float32", show_default=True)
@click.option("--with-past", is_flag=True, help="Export a decoder with KV-cache inputs and outputs for token-by-token "
                                               "generation.")
@click.option("--adapter-inputs", is_flag=True,
              help="Export the base once with each targeted layer's LoRA A/B as optional inputs, and write every "
                   "--adapter as an onnxruntime .onnx_adapter file (multi-LoRA serving).")
@click.option("--no-validate", "validate", is_flag=True, flag_value=False, default=True,
              help="Skip running the graph in onnxruntime against PyTorch.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Largest |logit difference| accepted.")
@force_option
@allow_pickle_option
@json_option
@click.pass_obj
def export_onnx_cmd(out, model_dir, output, adapters, weights, task, opset, dtype, with_past, adapter_inputs, validate,
                    atol, force, allow_pickle, as_json):
    """Export MODEL_DIR (a transformers model folder), with adapters merged, to ONNX in OUTPUT.

    Adapters are merged by the same code as `loratool merge`, so the graph is the base graph with
    other weights and runs exactly as fast. Inputs are input_ids and attention_mask with dynamic
    batch and sequence axes; the output is logits. Validation runs the graph in onnxruntime at two
    shapes and fails above --atol. OUTPUT holds model.onnx (+ model.onnx.data), config.json, tokenizer
    files and loratool_export.json with the export facts.

    \b
    Examples:
      loratool export-onnx base/ --adapter adapter/ -o onnx/
      loratool export-onnx base/ --adapter adapter/ --with-past -o onnx-decoder/
      loratool export-onnx base/ --adapter a/ --adapter b/ --adapter-inputs -o onnx-multi/
    """
    from ..api.export_onnx import export_onnx

    with out.status("exporting to ONNX"):
        result = export_onnx(model_dir, output, adapters=list(adapters), weights=weights, task=task, opset=opset,
                             dtype=dtype, with_past=with_past, validate=validate, atol=atol,
                             adapter_inputs=adapter_inputs, force=force, allow_pickle=allow_pickle)
    if out.notes_then_json(result, as_json):
        return
    check = (f", max |diff| vs PyTorch {max(result.max_diff):.2e}" if result.max_diff is not None else
             " (not validated)")
    files = f" + {len(result.adapter_files)} .onnx_adapter file(s)" if result.adapter_files else ""
    out.print(f"[green]exported[/] {result.model_type} to {result.output}/model.onnx{files}{check}, "
              f"{result.seconds:.1f}s")


@click.command("bench-onnx")
@click.argument("model_dir", type=click.Path())
@click.option("--adapter", required=True, type=click.Path(), help="The adapter to merge, or to serve unmerged.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seq", "sequence", type=int, default=128, show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--repeats", type=int, default=30, show_default=True, help="Timed rounds (after 3 warm-up rounds).")
@click.option("--work", type=click.Path(), default=None,
              help="Keep the exported graphs here and reuse them on the next run.")
@json_option
@click.pass_obj
def bench_onnx_cmd(out, model_dir, adapter, batch, sequence, provider, repeats, work, as_json):
    """Time the base, merged and unmerged-LoRA ONNX graphs and PyTorch eager, interleaved.

    Each round runs every variant once, so drift hits all alike; medians are reported with the
    ratios merged/base (the LoRA paper's no-extra-latency claim: about 1.0) and unmerged/base (the
    cost of keeping adapters swappable).
    """
    from rich.table import Table

    from ..api.bench_onnx import bench_onnx

    with out.status("benchmarking") as status:
        result = bench_onnx(model_dir, adapter, batch=batch, sequence=sequence, provider=provider, repeats=repeats,
                            work=work, progress=status)
    if out.notes_then_json(result, as_json):
        return
    table = Table(title=f"batch {result.batch}, seq {result.sequence}, {result.provider}, median of {result.repeats}",
                  title_justify="left")
    table.add_column("variant")
    table.add_column("median ms", justify="right")
    table.add_column("vs ONNX base", justify="right")
    base = result.median_ms["onnx base"]
    for label, value in result.median_ms.items():
        table.add_row(label, f"{value:.2f}", f"{value / base:.3f}")
    out.print(table)
    ratios = result.ratios
    out.print(f"merged/base {ratios['merged/base']:.3f}, unmerged/base {ratios['unmerged/base']:.3f}, "
              f"PyTorch/ONNX (merged) {ratios['torch merged/onnx merged']:.2f}")
