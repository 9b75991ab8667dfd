"""The `loratool` command group and its error boundary.

The group is lazy: a command's module is imported only when that command runs or shows its help, and
the command modules import their API function (and torch, where it needs it) inside the command body.
So `loratool --version`, `loratool --help` and `loratool CMD --help` import no torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from .. import __version__, env, interrupts
from ..errors import LoratoolError, printable

#: debug: print tracebacks; json: the command was given --json, so errors also go to stdout as JSON.
_state = {"debug": False, "json": False}

#: Command name -> (module in loratool.cli, attribute). The one list of commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect_cmd", "inspect_cmd"),
    "merge": ("merge_cmd", "merge_cmd"),
    "svd-extract": ("lowrank_cmd", "svd_extract_cmd"),
    "resize": ("lowrank_cmd", "resize_cmd"),
    "combine": ("combine_cmd", "combine_cmd"),
    "convert": ("formats_cmd", "convert_cmd"),
    "extract": ("formats_cmd", "extract_cmd"),
    "export-onnx": ("onnx_cmd", "export_onnx_cmd"),
    "bench-onnx": ("onnx_cmd", "bench_onnx_cmd"),
    "push": ("hub_cmd", "push_cmd"),
    "pull": ("hub_cmd", "pull_cmd"),
}


class LazyGroup(click.Group):
    """A Click group whose commands are imported by name on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        self.commands[name] = command
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (also LORATOOL_DEBUG=1).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes on stderr.")
@click.version_option(__version__, prog_name="loratool")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Inspect, merge, convert, extract, resize and combine LoRA adapters and model checkpoints.

    Every command reads .safetensors files, sharded folders (model.safetensors.index.json), diffusers
    pipeline folders and single-file SD/SDXL/Flux checkpoints lazily; adapters may be PEFT (LoRA,
    LoHa, LoKr), kohya/LyCORIS or diffusers files. Outputs are written atomically and durably: nothing
    half-written is ever left, and a finished output is on disk (fsynced) before the command returns.
    """
    from .output import Output

    _state["debug"] = debug or env.debug_enabled()
    ctx.obj = Output(quiet=quiet)


def _fail(message: str, code: int, hint: str | None = None, line: bool = True) -> int:
    """One `Error: …` line on stderr (unless `line` is False: --debug printed the traceback instead), and
    with --json also `{"error": …, "hint": …, "exit_code": …}` on stdout, for scripts. Names read from
    files reach this line, so control characters (a newline, an ANSI escape) are shown escaped: the
    line stays one line, and the terminal is never driven by an input file."""
    message, hint = printable(message), hint and printable(hint)
    if line:
        click.echo(f"Error: {message.rstrip('.') + f'. {hint[0].upper()}{hint[1:]}' if hint else message}", err=True)
    if _state["json"]:
        from .output import error_json

        error_json(message, hint, code)
    return code


def _interrupted() -> int:
    # On a terminal the line starts after the `^C` the terminal echoed; in pipes it is the only line.
    prefix = "\n" if sys.stderr.isatty() else ""
    click.echo(f"{prefix}{interrupts.message()}", err=True)
    return interrupts.EXIT_CODE


def _quiet_stdout() -> None:
    """The reader of our stdout went away (`| head`): drop further output instead of erroring at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _run(argv: list[str] | None) -> int:
    try:
        # What `cli.main` does, minus its handling of Ctrl-C (a blank line on stderr, then Abort).
        completion = getattr(cli, "_main_shell_completion", None)
        if completion is not None:
            completion({}, "loratool")
        with cli.make_context("loratool", list(sys.argv[1:] if argv is None else argv)) as ctx:
            code = cli.invoke(ctx)
        sys.stdout.flush()
        return code if isinstance(code, int) else 0
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place every failure is turned into an exit code
        return _exit_code(e)


def _exit_code(e: BaseException) -> int:
    if interrupts.interrupted():
        # Whatever the interrupt turned into on its way up (an import torn in half can surface as
        # ImportError), the user asked to stop.
        return _interrupted()
    if isinstance(e, click.exceptions.Exit):
        return e.exit_code
    if isinstance(e, click.ClickException):
        e.message = printable(e.message)
        e.show()
        if _state["json"]:
            from .output import error_json

            error_json(e.format_message(), getattr(e, "hint", None), e.exit_code)
        return e.exit_code
    if isinstance(e, (KeyboardInterrupt, click.exceptions.Abort)):
        return _interrupted()
    if isinstance(e, BrokenPipeError):
        _quiet_stdout()
        return 141
    if not isinstance(e, Exception):
        raise e
    if _state["debug"]:
        traceback.print_exception(e)
    if isinstance(e, LoratoolError):
        return _fail(str(e), e.exit_code, getattr(e, "hint", None))
    if isinstance(e, OSError):
        return _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 2)
    if _state["debug"]:
        return _fail(f"unexpected {type(e).__name__}: {e}", 1, line=False)
    return _fail(f"unexpected {type(e).__name__}: {e}", 1, "rerun with --debug for the traceback")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map every failure to one line on stderr and an exit code (2 bad input, 1 bug, 130 Ctrl-C
    or SIGTERM). The signal handlers are put back as they were on return, for in-process callers."""
    previous = interrupts.install()
    _state["debug"] = env.debug_enabled()
    _state["json"] = False
    try:
        with interrupts.armed():
            return _run(argv)
    except KeyboardInterrupt:  # in the instant between arming and `_run`'s own handler
        return _interrupted()
    finally:
        interrupts.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
