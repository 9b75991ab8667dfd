"""The instant CLI, interrupts and durable outputs (issue 14).

No timings are asserted here: what is checked is which modules get imported, what a signal does, and
which paths are fsynced before and after the rename that publishes an output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratool.checkpoint.output import TEMP_MARK

FIXTURES = Path(__file__).parent.parent / "fixtures"
ROOT = Path(__file__).parent.parent
HEAVY = ("torch", "onnx", "onnxruntime", "huggingface_hub", "transformers", "numpy", "safetensors", "ray")
COMMANDS = ["inspect", "merge", "svd-extract", "resize", "combine", "convert", "extract", "export-onnx",
            "bench-onnx", "push", "pull"]
# Runs the CLI in a fresh interpreter with stdout silenced, then reports which heavy modules it imported.
PROBE = """
import contextlib, io, json, sys
from loratool.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def child_env() -> dict:
    env = dict(os.environ, LORATOOL_NO_PROGRESS="1")
    # The worktree's loratool wins over any installed copy.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def probe(*args) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                            env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loratool_and_the_cli_group_imports_nothing_heavy():
    code = ("import sys, loratool, loratool.cli, loratool.api; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--version"], ["--help"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_and_version_import_no_torch(args):
    report = probe(*args)
    assert report["code"] == 0
    assert not {"torch", "onnx", "onnxruntime", "huggingface_hub", "transformers", "ray"} & set(report["loaded"])


@pytest.mark.parametrize("path", ["tiny-llama", "tiny-llama/model.safetensors"])
def test_inspect_of_a_checkpoint_reads_headers_without_torch(path, tmp_path):
    report = probe("inspect", FIXTURES / path, "--json")
    assert report["code"] == 0 and "torch" not in report["loaded"], report
    assert probe("inspect", FIXTURES / path)["loaded"] == [m for m in report["loaded"] if m != "torch"]


def test_inspect_of_a_sharded_checkpoint_without_torch(tmp_path, run_cli):
    sharded = tmp_path / "sharded"
    assert run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "--max-shard-size", "100KB",
                   "-o", sharded).code == 0
    report = probe("inspect", sharded, "--json", "--tensors")
    assert report["code"] == 0 and "torch" not in report["loaded"], report
    assert "torch" in probe("inspect", sharded, "--check")["loaded"]  # the NaN scan does need torch


def _adapters_without_config(tmp_path, run_cli) -> dict[str, Path]:
    """The adapter files people inspect: a PEFT folder, its weights alone, kohya and diffusers files."""
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((FIXTURES / "lora-llama" / "adapter_model.safetensors").read_bytes())
    assert run_cli("convert", FIXTURES / "lora-llama-qv", "--to", "kohya", "-o", tmp_path / "k.safetensors").code == 0
    assert run_cli("convert", FIXTURES / "lora-llama-qv", "--to", "diffusers", "--component", "text_encoder",
                   "-o", tmp_path / "d.safetensors").code == 0
    return {"peft": FIXTURES / "lora-llama-qv", "bare": bare, "kohya": tmp_path / "k.safetensors",
            "diffusers": tmp_path / "d.safetensors"}


def test_inspect_of_adapters_reads_headers_without_torch(tmp_path, run_cli):
    """PEFT, bare PEFT weights, kohya and diffusers LoRA files are described from their headers, and the
    description is the one a full read gives (`--check` reads every tensor, with torch)."""
    for kind, path in _adapters_without_config(tmp_path, run_cli).items():
        report = probe("inspect", path, "--json", "--tensors")
        assert report["code"] == 0 and "torch" not in report["loaded"], (kind, report)
        fast = json.loads(subprocess.run([sys.executable, "-m", "loratool", "inspect", str(path), "--json",
                                          "--tensors"], capture_output=True, text=True, env=child_env()).stdout)
        full = json.loads(subprocess.run([sys.executable, "-m", "loratool", "inspect", str(path), "--json",
                                          "--tensors", "--check"], capture_output=True, text=True,
                                         env=child_env()).stdout)
        assert full.pop("nonfinite") == {}
        assert fast == full, kind


def test_cli_choice_lists_match_the_registries():
    from loratool.api import export_onnx
    from loratool.cli import params
    from loratool.export import graph
    from loratool.formats.gguf import GGUF_DTYPES

    assert params.GGUF_DTYPES == tuple(GGUF_DTYPES)
    assert params.ONNX_DTYPES == tuple(export_onnx.DTYPES)
    assert params.ONNX_TASKS == tuple(graph.TASKS)


def test_formats_and_methods_registries_drive_the_cli(run_cli):
    """`--format`, `--to` and `--method` take their choices and help from the registries, so a new entry
    there is a new choice here."""
    from loratool.formats import REGISTRY, WRITABLE
    from loratool.lora.methods import METHODS

    combine_help = run_cli("combine", "--help").stdout
    convert_help = " ".join(run_cli("convert", "--help").stdout.split())
    assert all(m.name in combine_help and m.summary.split(";")[0] in " ".join(combine_help.split())
               for m in METHODS.values())
    assert all(name in convert_help for name in REGISTRY) and all(f.summary in convert_help for f in REGISTRY.values())
    assert f"[{'|'.join((*WRITABLE, 'gguf'))}]" in convert_help.replace(" ", "")
    assert run_cli("combine", "a", "b", "-o", "x", "--method", "nope").code == 2


def test_lazy_api_names_are_the_functions():
    import types

    import loratool
    import loratool.api.merge

    assert isinstance(loratool.api.merge, types.ModuleType)  # a submodule is the submodule, nothing else
    assert callable(loratool.merge) and loratool.merge.__name__ == "merge"
    assert loratool.merge is loratool.api.merge.merge
    from loratool import MergeResult, inspect

    assert inspect.__name__ == "inspect" and MergeResult.__name__ == "MergeResult"
    assert set(loratool.__all__) >= {"merge", "inspect", "combine", "convert", "extract", "resize", "svd_extract"}
    with pytest.raises(AttributeError):
        loratool.no_such_thing  # noqa: B018


def test_every_command_is_registered_lazily():
    from loratool.cli import COMMANDS as table
    from loratool.cli import cli

    assert sorted(table) == sorted(COMMANDS)
    for name in table:
        assert cli.get_command(None, name).name == name


def test_in_process_main_restores_the_signal_handlers(run_cli):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert run_cli("--version").code == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def wait_until_handled(pid: int, signum: int, timeout: float = 30.0) -> bool:
    """Poll /proc until the process catches `signum` (its handlers are installed); False if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signum - 1) & 1:
            return True
        time.sleep(0.002)
    raise AssertionError(f"process {pid} never installed a handler for signal {signum}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see when handlers are in place")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_right_after_start_exits_130_with_one_line(tmp_path, signum):
    """A merge spends its first second or two importing torch; a signal then must not print a traceback.

    The signal is sent as soon as the child has installed its handlers (the first thing it does, before
    importing click or torch; Python's own start-up comes before that and is not ours to handle), or a
    little later; a run that finished first is retried with an earlier moment."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "loratool", "merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", out]
    for delay in (0.0, 0.2, 0.5, 0.1, 0.0, 0.05):
        proc = subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env())
        # SIGTERM is the last of the two handlers installed, so it tells when both are in place.
        if not wait_until_handled(proc.pid, signal.SIGTERM) or (time.sleep(delay) or proc.poll() is not None):
            proc.communicate()
            continue
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0 or "in place" in stderr:  # the signal came after the publish; try again
            assert out.exists() and "no output was written" not in stderr, stderr
            shutil.rmtree(out)
            continue
        assert proc.returncode == 130, (proc.returncode, stderr)
        assert stderr.splitlines() == ["Error: interrupted; no output was written"], stderr
        assert "Traceback" not in stderr and stdout == ""
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
        return
    pytest.fail("the merge always finished before the signal arrived")


def test_closed_stdout_is_quiet(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "loratool", "inspect", str(FIXTURES / "tiny-llama"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    proc.stdout.close()  # the reader is gone before the child writes, like `| head` that has had enough
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 141 and stderr == "", stderr


# --- durability -----------------------------------------------------------------------------------------


@pytest.fixture
def fsync_log(monkeypatch):
    """Record, in order, every path fsynced and every rename."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        events.append(("replace", Path(src).resolve(), Path(dst).resolve()))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_durable(events: list[tuple], out: Path) -> None:
    """Every file and folder of `out` was fsynced under its temp name before the rename onto `out`, and
    `out`'s parent after it."""
    out = out.resolve()
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == out]
    assert len(renames) == 1, events
    at = renames[0]
    temp = events[at][1]
    before = {e[1] for e in events[:at] if e[0] == "fsync"}
    after = {e[1] for e in events[at + 1:] if e[0] == "fsync"}
    published = [out, *out.rglob("*")] if out.is_dir() else [out]
    assert published and all(p.is_file() or p.is_dir() for p in published)
    for path in published:
        assert temp / path.relative_to(out) in before or (path == out and temp in before), (path, sorted(before))
    assert out.parent in after


@pytest.mark.parametrize("case", ["merge-folder", "merge-file", "convert", "resize", "combine", "svd-extract",
                                  "extract"])
def test_every_output_is_fsynced_before_its_rename(run_cli, tmp_path, fsync_log, case):
    out = tmp_path / "deep" / "out"
    if case == "merge-folder":
        args = ["merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", out]
    elif case == "merge-file":
        out = out.with_suffix(".safetensors")
        args = ["merge", FIXTURES / "tiny-llama" / "model.safetensors", FIXTURES / "lora-llama", "-o", out]
    elif case == "convert":
        out = out.with_suffix(".safetensors")
        args = ["convert", FIXTURES / "lora-llama", "--to", "kohya", "-o", out]
    elif case == "resize":
        args = ["resize", FIXTURES / "lora-llama", "--rank", "2", "-o", out]
    elif case == "combine":
        args = ["combine", FIXTURES / "lora-llama", FIXTURES / "lora-llama-qv", "--method", "cat", "-o", out]
    elif case == "svd-extract":
        merged = tmp_path / "merged"
        assert run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", merged).code == 0
        args = ["svd-extract", FIXTURES / "tiny-llama", merged, "--rank", "4", "-o", out]
    else:
        args = ["extract", FIXTURES / "loralib-tiny" / "train.safetensors", "--alpha", "16", "-o", out,
                "--base-out", tmp_path / "clean-base"]
    fsync_log.clear()
    result = run_cli(*args)
    assert result.code == 0, result
    assert_durable(fsync_log, out)
    if case == "extract":
        assert_durable(fsync_log, tmp_path / "clean-base")


def test_force_replacing_an_output_is_durable_too(run_cli, tmp_path, fsync_log):
    out = tmp_path / "out"
    args = ["merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", out]
    assert run_cli(*args).code == 0
    fsync_log.clear()
    assert run_cli(*args, "--force").code == 0
    assert_durable(fsync_log, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_package_exports_the_api_names():
    import loratool

    for name in set(loratool.__all__) - {"__version__"}:
        value = getattr(loratool, name)
        assert value.__name__ == name and value.__module__.startswith("loratool.api."), name
