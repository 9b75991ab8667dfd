"""`loratool inspect`: rich tables for people, `--json` for scripts.

Every string a file put in the report (names, targets, metadata) is shown escaped (`errors.printable`)
and never read as rich markup. The `--tensors` listing is plain aligned lines written as they are
formatted, not a rich table: rich lays a table out whole, which took 3 minutes and 1.3 GB for 400k
tensors (docs/checkpoints.md has the figures).
"""

from __future__ import annotations

import click

from ..errors import printable
from ..units import format_bytes
from .params import LocationType, allow_pickle_option, json_option


def _summary(report: dict):
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # wraps at spaces; only a path longer than the line is folded
    rows = [("path", report["path"]), ("kind", report["kind"]), ("format", report["format"])]
    if report.get("architecture"):
        rows.append(("architecture", f"{report['architecture']} (llama.cpp)"))
    if report["kind"] == "adapter":
        rows += [
            ("base model", report["base_model"] or "(not recorded)"),
            *([("family", f"{report['family']} (from {report['family_from']})")] if report["family"] else []),
            ("modules", str(report["modules"])),
            ("algorithms", ", ".join(f"{name} ({count})" for name, count in report["algorithms"].items())),
            ("targets", ", ".join(report["targets"])),
            ("layers", _ranges(report["layers"]) or "-"),
            ("r / alpha", _r_alpha(report)),
            ("rsLoRA", "yes" if report["use_rslora"] else "no"),
            ("DoRA", "yes" if report["use_dora"] else "no"),
        ]
        if report["modules_to_save"]:
            rows.append(("full tensors", ", ".join(report["modules_to_save"])))
    else:
        rows += [("files", f"{len(report['files'])}{' (sharded, index.json)' if report['sharded'] else ''}")]
        named = " ".join(str(report[k]) for k in ("family", "variant") if report.get(k))
        rows.append(("layout", f"{report['layout']} {named}".rstrip()))
        components = {name: kind for name, kind in report["components"].items() if name != "model"}
        if components:
            rows.append(("components", ", ".join(f"{name} ({kind})" for name, kind in components.items())))
        if report["model_type"]:
            rows.append(("model type", report["model_type"]))
        if report.get("embedded_adapter"):
            rows.append(("LoRA inside", f"{report['embedded_adapter']} (loratool extract pulls it out)"))
    rows += [
        ("tensors", f"{report['tensors']:,}"),
        ("parameters", f"{report['parameters']:,}"),
        ("size", format_bytes(report["bytes"])),
    ]
    for key, value in rows:
        table.add_row(key, _text(value))
    return table


def _text(value: str):
    """A table cell shown as it is: no rich markup read from a name in a file."""
    from rich.text import Text

    return Text(value)


def _shown(value):
    """The report with every string (keys too) escaped for a terminal; the tensor listing is left to
    `_tensor_lines`, which escapes each name as it writes it."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_shown(k): (v if k == "tensor_list" else _shown(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    return value


def _r_alpha(report: dict) -> str:
    """`8 / 16`; a value that differs between modules is `per target` (the table below has each)."""
    rank = _or_dash(report["r"], "g", "per target")
    alpha = (_or_dash(report["lora_alpha"], "g", "per target") if report["lora_alpha_known"]
             else "unknown (pass --alpha)")
    return f"{rank} / {alpha}"


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _dtypes(report: dict):
    from rich.table import Table

    table = Table(title="dtypes", title_justify="left")
    for column in ("dtype", "tensors", "parameters", "size", "B/param"):
        table.add_column(column, justify="left" if column == "dtype" else "right")
    for dtype, entry in report["dtypes"].items():
        per_parameter = f"{entry['bytes'] / entry['parameters']:.3g}" if entry["parameters"] else "-"
        table.add_row(_text(dtype), f"{entry['tensors']:,}", f"{entry['parameters']:,}", format_bytes(entry["bytes"]),
                      per_parameter)
    return table


def _groups(report: dict, width: int = 80):
    """The modules-by-target table, laid out for `width` columns without breaking a word: the numbers
    never wrap; when the table is too wide, the algorithm wraps at its spaces, then the table drops its
    borders, and only then is the target column narrowed, folding the longest names (the only cells
    that may ever be split)."""
    from rich.table import Table

    groups = report["groups"]
    lycoris = any(g["algorithm"] not in ("lora", "locon") or g["tucker"] for g in groups)
    dora = any(g["dora"] for g in groups)
    columns = ["target", "algorithm", "kind", "modules", "rank", "alpha", "scale", *(["DoRA"] if dora else []),
               *(["params"] if lycoris else [])]
    rows = []
    for g in groups:
        algorithm = g["algorithm"] + (" Tucker" if g["tucker"] else "")
        if g["factor"]:
            algorithm += " " + "×".join(map(str, g["factor"]))
        rows.append([g["target"], algorithm, g["kind"], str(g["modules"]), _or_dash(g["rank"]),
                     _or_dash(g["alpha"], "g"), f"{g['scale']:.4g}", *(["yes" if g["dora"] else ""] if dora else []),
                     *([f"{g['parameters']:,}"] if lycoris else [])])
    natural = [max(len(cell) for cell in (column, *(row[i] for row in rows))) for i, column in enumerate(columns)]
    floors = [(1, max(len(word) for cell in ("algorithm", *(row[1] for row in rows)) for word in cell.split()))]
    # With borders: padding and a border per cell, and one more border; without: the padding between cells.
    for overhead, style in ((3 * len(columns) + 1, {}), (2 * (len(columns) - 1), {"box": None, "pad_edge": False})):
        fitted, excess = _fit(natural, floors, overhead, width)
        if excess <= 0:
            break
    else:
        fitted, excess = _fit(natural, [*floors, (0, 8)], overhead, width)
    table = Table(title="modules by target", title_justify="left", **style)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < 3 else "right", no_wrap=i > 1, overflow="fold" if i == 0 else "ellipsis",
                         width=fitted[i] if i < 2 and fitted[i] < natural[i] else None)
    for row in rows:
        table.add_row(*map(_text, row))
    return table


def _fit(natural: list[int], floors, overhead: int, width: int) -> tuple[list[int], int]:
    """Column widths that fit `width`, narrowing the columns in `floors` ((index, narrowest), in order)
    by what is too much; and how much is still too much."""
    fitted, excess = list(natural), sum(natural) + overhead - width
    for index, floor in floors:
        cut = max(0, min(excess, fitted[index] - floor))
        fitted[index] -= cut
        excess -= cut
    return fitted, excess


def _or_dash(value, spec: str = "", none: str = "-") -> str:
    """A number, or "-" where the algorithm has none (a full diff's rank and alpha)."""
    return none if value is None else format(value, spec)


#: The widest a listing column is padded to; a longer cell (a very long name) just pushes its line wider.
_MAX_PAD = 96


def _tensor_lines(rows: list[dict]):
    """The `--tensors` listing as plain lines: a title, a header, then one line per tensor (name, dtype,
    shape, size), columns padded to their widest cell up to `_MAX_PAD`. Linear in the number of tensors;
    the lines are produced one by one, for `Output.lines` to write as they come."""
    names = [printable(t["name"]) for t in rows]
    dtypes = [printable(str(t["dtype"])) for t in rows]
    shapes = ["×".join(map(str, t["shape"])) or "scalar" for t in rows]
    sizes = [format_bytes(t["bytes"]) for t in rows]
    width = [min(_MAX_PAD, max([len(column), *map(len, cells)]))
             for column, cells in (("name", names), ("dtype", dtypes), ("shape", shapes), ("size", sizes))]
    yield "tensors"
    yield f"{'name':<{width[0]}}  {'dtype':<{width[1]}}  {'shape':<{width[2]}}  {'size':>{width[3]}}"
    for row in zip(names, dtypes, shapes, sizes):
        yield f"{row[0]:<{width[0]}}  {row[1]:<{width[1]}}  {row[2]:<{width[2]}}  {row[3]:>{width[3]}}"


@click.command("inspect")
@click.argument("path", type=LocationType("adapter"))
@json_option
@click.option("--tensors", is_flag=True, help="List every tensor with dtype, shape and size.")
@click.option("--check", is_flag=True, help="Read all tensor data and report NaN/Inf (exit 2 if any).")
@allow_pickle_option
@click.pass_obj
def inspect_cmd(out, path, as_json, tensors, check, allow_pickle):
    """Describe a checkpoint or adapter at PATH.

    PATH is a .safetensors file, a sharded index.json, a model folder, a PEFT adapter folder or a
    .gguf file (a llama.cpp LoRA adapter or model).
    Adapters show rank, alpha and scale per target, the layers covered, DoRA/rsLoRA and the base
    model. Checkpoints show files, tensors, parameters and a dtype breakdown. The --json keys are
    stable; see docs/inspect.md.
    """
    from ..api.inspect import inspect

    with out.progress("checking") as advance:
        report = inspect(path, check=check, tensors=tensors, allow_pickle=allow_pickle, progress=advance)
    if as_json:
        out.json(report, rows="tensor_list")
    else:
        from rich.markup import escape

        shown = _shown(report)
        out.print(_summary(shown))
        out.print(_dtypes(shown))
        if shown["kind"] == "adapter":
            out.print(_groups(shown, out.stdout.width))
        if tensors:
            out.lines(_tensor_lines(report["tensor_list"]))
        metadata = report.get("metadata") or {}
        if any(metadata.values()):  # a dict's repr already escapes what is not printable in its strings
            out.print(_text("metadata: " + ", ".join(f"{printable(f)}: {printable(str(m))}"
                                                     for f, m in metadata.items() if m)))
        if check:
            bad = shown["nonfinite"]
            out.print(f"[red]NaN/Inf in {len(bad)} tensor(s):[/] " + escape(", ".join(bad)) if bad
                      else "[green]all values finite[/]")
    if check and report["nonfinite"]:
        raise click.exceptions.Exit(2)
