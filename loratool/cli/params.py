"""Shared Click options and parameter types, defined once.

Nothing here imports torch, so that `loratool CMD --help` stays instant. Adapter formats and combine
methods come from their registries (`loratool.formats`, `loratool.lora.methods`), which are torch-free;
the lists below are copies of tables whose modules import torch or gguf, and tests/test_cli_fast.py
fails when they drift apart.
"""

from __future__ import annotations

import re

import click

from ..dtypes import OUTPUT_DTYPE_CHOICES
from ..formats import CONVERT_TARGETS, EMBEDDED, FORMATS, REGISTRY
from ..lora.methods import METHODS

#: The names of `loratool.formats.gguf.GGUF_DTYPES`.
GGUF_DTYPES = ("float32", "float16", "bfloat16", "q8_0")
#: `loratool.api.export_onnx.DTYPES` and `loratool.export.graph.TASKS`.
ONNX_DTYPES = ("float32", "float16")
ONNX_TASKS = ("causal-lm",)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class WeightListType(click.ParamType):
    """Comma-separated floats: `1,0.5` or `-1`."""

    name = "W1,W2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [float(part) for part in value.split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers (e.g. 1,0.5 or -1)", param, ctx)


def output_option(f):
    return click.option("-o", "--output", "output", required=True, type=click.Path(),
                        help="Where to write. Must not exist (or pass --force) and must not be an input.")(f)


def force_option(f):
    return click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")(f)


def allow_pickle_option(f):
    return click.option(
        "--allow-pickle", is_flag=True,
        help="Load pickle checkpoints (.bin/.pt/.ckpt) with torch.load(weights_only=True). Off by default: "
             "pickle files can run code.",
    )(f)


def dtype_option(f):
    return click.option("--dtype", type=click.Choice(OUTPUT_DTYPE_CHOICES), default="auto", show_default=True,
                        help="Output float dtype; auto keeps each tensor's own.")(f)


def device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                        help="Where the arithmetic runs; auto picks CUDA when torch sees one.")(f)


def _json_errors(ctx, param, value):
    """--json is eager, so even a bad value in a later option is reported as JSON on stdout."""
    if value:
        from . import _state

        _state["json"] = True
    return value


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, is_eager=True, callback=_json_errors,
                        help="Print machine-readable JSON to stdout; a failure prints {error, hint, exit_code} "
                             "there too.")(f)


def adapter_format_options(f):
    """--format and --alpha for commands that read adapters in any format."""
    f = click.option("--alpha", type=float, default=None,
                     help="lora_alpha for formats that do not store it (loralib, bare PEFT state dicts).")(f)
    return click.option("--format", "adapter_format", type=click.Choice(FORMATS), default=None,
                        help="Adapter format; detected from the files when not given. "
                             + "; ".join(f"{f.name}: {f.summary}" for f in REGISTRY.values()) + ".")(f)


def base_option(f):
    return click.option("--base", type=LocationType("model"), default=None,
                        help="The base model (checkpoint or diffusers pipeline folder), to map kohya's flattened "
                             "module names back to real ones.")(f)


class LocationType(click.ParamType):
    """A local path, or `hf://owner/name[@revision]`, downloaded into the HF cache when used."""

    name = "PATH|hf://REPO"

    def __init__(self, kind: str = "adapter"):
        self.kind = kind

    def convert(self, value, param, ctx):
        from ..hub.client import HF_SCHEME, resolve_location

        if not str(value).startswith(HF_SCHEME):
            return value
        return str(resolve_location(str(value), self.kind))


def rank_options(f):
    """--rank / --energy / --max-rank: how to pick each module's rank when factorising a ΔW."""
    f = click.option("--max-rank", type=int, default=None,
                     help="Upper bound on any module's rank (with --energy, or to cap --rank).")(f)
    f = click.option("--energy", type=float, default=None,
                     help="Per module, the smallest rank keeping this fraction of ‖ΔW‖²_F (e.g. 0.9). "
                          "Ranks then differ per module and are written as rank_pattern/alpha_pattern.")(f)
    return click.option("--rank", "-r", type=int, default=None,
                        help="Rank of every module (capped at min(out, in)).")(f)


def scale_out_options(f):
    """--ray [ADDRESS] and --gpus-per-task: run the command's tasks on a Ray cluster (loratool[ray])."""
    f = click.option("--gpus-per-task", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="With --ray: GPUs each task asks Ray for (a fraction shares a GPU). Default 1 with "
                          "--device cuda.")(f)
    return click.option("--ray", "ray", default=None, is_flag=False, flag_value="auto", metavar="ADDRESS",
                        help="Run on a Ray cluster (needs loratool[ray]): auto (RAY_ADDRESS, else the cluster "
                             "`ray start` made here; the default for a bare --ray), ray://HOST:PORT, HOST:PORT, "
                             "or local (a private one-node Ray). Inputs and OUT must be on storage every node "
                             "sees; see docs/scale-out.md.")(f)
