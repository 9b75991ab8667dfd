"""The `loratool` command group and its error boundary."""

from __future__ import annotations

import signal
import sys
import traceback

import click

from .. import __version__, env
from ..errors import LoratoolError
from .output import Output

_state = {"debug": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (also LORATOOL_DEBUG=1).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes on stderr.")
@click.version_option(__version__, prog_name="loratool")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Inspect, merge, extract, resize and combine LoRA adapters and model checkpoints.

    Every command reads .safetensors files, sharded folders (model.safetensors.index.json) and PEFT
    adapter folders lazily, and writes its output atomically: nothing half-written is ever left.
    """
    _state["debug"] = debug or env.debug_enabled()
    ctx.obj = Output(quiet=quiet)


def _register() -> None:
    from .combine_cmd import combine_cmd
    from .formats_cmd import convert_cmd, extract_cmd
    from .hub_cmd import pull_cmd, push_cmd
    from .onnx_cmd import bench_onnx_cmd, export_onnx_cmd
    from .inspect_cmd import inspect_cmd
    from .lowrank_cmd import resize_cmd, svd_extract_cmd
    from .merge_cmd import merge_cmd

    for command in (inspect_cmd, merge_cmd, svd_extract_cmd, resize_cmd, combine_cmd, convert_cmd, extract_cmd,
                    export_onnx_cmd, bench_onnx_cmd, push_cmd, pull_cmd):
        cli.add_command(command)


_register()


def _fail(message: str, code: int) -> int:
    click.echo(f"Error: {message}", err=True)
    return code


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map every failure to one line on stderr and an exit code (2 bad input, 1 bug, 130 Ctrl-C)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _state["debug"] = env.debug_enabled()
    try:
        # Without standalone mode, click returns the code of a `click.exceptions.Exit` instead of raising it.
        code = cli.main(args=argv, prog_name="loratool", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        return _fail("interrupted; no output was written", 130)
    except LoratoolError as e:
        if _state["debug"]:
            traceback.print_exc()
        return _fail(str(e), e.exit_code)
    except OSError as e:
        if _state["debug"]:
            traceback.print_exc()
        return _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 2)
    except Exception as e:  # noqa: BLE001 - the one place every unexpected failure is caught
        if _state["debug"]:
            traceback.print_exc()
            return 1
        return _fail(f"unexpected {type(e).__name__}: {e}. Rerun with --debug for the traceback", 1)


if __name__ == "__main__":
    sys.exit(main())
