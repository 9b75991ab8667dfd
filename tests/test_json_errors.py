"""With --json, a failure is a JSON object on stdout ({"error", "hint", "exit_code"}) as well as the one
`Error: …` line on stderr; exit codes are unchanged (2 bad input, 1 unexpected)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent.parent / "fixtures"
#: One failing invocation per command with --json: a missing input, so every one is bad input (exit 2).
MISSING = "/nonexistent/loratool-input"
JSON_FAILURES = {
    "inspect": [MISSING],
    "merge": [MISSING, MISSING],
    "svd-extract": [MISSING, MISSING, "--rank", "2", "-o", "{out}"],
    "resize": [MISSING, "--rank", "2", "-o", "{out}"],
    "combine": [MISSING, MISSING, "--method", "cat", "-o", "{out}"],
    "convert": [MISSING, "--to", "peft", "-o", "{out}"],
    "extract": [MISSING, "-o", "{out}"],
    "export-onnx": [MISSING, "-o", "{out}"],
    "bench-onnx": [MISSING, "--adapter", MISSING],
    "push": [MISSING, "me/repo", "--dry-run"],
    "pull": ["me/not-cached", "-o", "{out}"],  # HF_HUB_OFFLINE=1 (conftest): not in the cache
}


def test_every_command_with_json_is_covered():
    import click

    from loratool.cli import cli

    ctx = click.Context(cli)
    with_json = {name for name in cli.list_commands(ctx)
                 if any(p.name == "as_json" for p in cli.get_command(ctx, name).params)}
    assert with_json == set(JSON_FAILURES)


@pytest.mark.parametrize("command", sorted(JSON_FAILURES))
def test_errors_are_json_on_stdout_and_one_line_on_stderr(run_cli, tmp_path, command):
    args = [a.format(out=tmp_path / "out") for a in JSON_FAILURES[command]]
    plain = run_cli(command, *args)
    assert plain.code == 2 and plain.stdout == "", plain
    result = run_cli(command, *args, "--json")
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result
    assert json.loads(result.stdout) == {"error": lines[0].removeprefix("Error: "), "hint": None, "exit_code": 2}
    assert not (tmp_path / "out").exists()


def test_usage_errors_are_json_too(run_cli):
    # --json is eager: a bad value in an option given before it is still reported as JSON.
    result = run_cli("merge", "--weights", "one", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "--json")
    assert result.code == 2, result
    assert "comma-separated" in json.loads(result.stdout)["error"]
    assert "Error: " in result.stderr and "Traceback" not in result.stderr


def test_unexpected_errors_carry_the_debug_hint(run_cli, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(importlib.import_module("loratool.api.inspect"), "inspect", broken)
    result = run_cli("inspect", FIXTURES / "lora-llama", "--json")
    assert result.code == 1, result
    assert json.loads(result.stdout) == {"error": "unexpected RuntimeError: boom",
                                         "hint": "rerun with --debug for the traceback", "exit_code": 1}
    assert result.stderr.strip().splitlines() == ["Error: unexpected RuntimeError: boom. Rerun with --debug for "
                                                  "the traceback"]
    debug = run_cli("--debug", "inspect", FIXTURES / "lora-llama", "--json")
    assert debug.code == 1 and "Traceback" in debug.stderr and json.loads(debug.stdout)["hint"] is None
    plain = run_cli("inspect", FIXTURES / "lora-llama")
    assert plain.code == 1 and plain.stdout == ""  # without --json, stdout stays empty


def test_json_results_are_strict_json_and_report_non_finite_numbers(capsys):
    import math

    from loratool.cli.output import Output

    Output().json({"scale": math.nan, "modules": [{"alpha": math.inf}, {"alpha": 2.0}], "problems": ["x"]})
    report = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    assert report["scale"] is None and report["modules"][0]["alpha"] is None and report["modules"][1]["alpha"] == 2.0
    assert report["problems"] == ["x", "scale is nan, not a finite number", "modules[0].alpha is inf, not a finite number"]
    Output().json({"tensors": 1, "tensor_list": [{"name": "a"}], "bytes": -math.inf}, rows="tensor_list")
    listed = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    assert list(listed) == ["tensors", "tensor_list", "bytes", "problems"] and listed["tensor_list"] == [{"name": "a"}]
