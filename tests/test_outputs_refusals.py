"""Outputs (issue 19, item 4): what may be replaced, two runs to one OUT, interrupts around the rename,
folders that `-o` made, and what is copied out of a pipeline folder.

Signals are injected at the exact step they test (a wrapped `os.replace`, a child that signals itself
from a thread while its main thread waits at a known point), so nothing here depends on timing; the
one test with two real concurrent runs asserts what must hold whichever run gets there first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import assert_refused, ok
from loratool import interrupts
from loratool.checkpoint import output
from loratool.checkpoint.output import LOCK_SUFFIX, TEMP_MARK, atomic_output, copy_regular, copy_regular_file
from loratool.errors import InvalidCheckpointError, OutputPathError

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "fixtures"
BASE_FILE = FIXTURES / "tiny-llama" / "model.safetensors"
BASE_FOLDER = FIXTURES / "tiny-llama"
ADAPTER = FIXTURES / "lora-llama"


def child_env() -> dict:
    env = dict(os.environ, LORATOOL_NO_PROGRESS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def leftovers(folder: Path) -> list[str]:
    """Temp siblings, replaced copies moved aside and lock files: what must never stay behind."""
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The tensors a plain merge of the fixtures gives, to tell a complete output from anything else."""
    from loratool import merge

    out = tmp_path_factory.mktemp("reference") / "m.safetensors"
    merge(BASE_FILE, [ADAPTER], out)
    return load_file(str(out))


def same_tensors(path: Path, reference: dict) -> bool:
    got = load_file(str(path))
    return got.keys() == reference.keys() and all((got[k] == reference[k]).all() for k in got)


# --- what may be replaced -------------------------------------------------------------------------------


def make_special(kind: str, path: Path):
    if kind == "fifo":
        os.mkfifo(path)
        return None
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    return server


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind, words", [("fifo", "FIFO"), ("socket", "socket")])
def test_a_fifo_or_socket_at_out_is_refused(run_cli, tmp_path, kind, words, force):
    out = tmp_path / "out.safetensors"
    keep = make_special(kind, out)
    try:
        before = os.lstat(out)
        result = run_cli("merge", BASE_FILE, ADAPTER, "-o", out, *(["--force"] if force else []))
        line = assert_refused(result, None, words, "only a regular file or folder")
        assert "--force" not in line  # no hint that --force would help: it would not
        after = os.lstat(out)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        assert leftovers(tmp_path) == []
    finally:
        if keep is not None:
            keep.close()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_dev_null_is_refused_before_anything_is_written(run_cli, tmp_path, force):
    """As root a rename onto /dev/null would replace the device: the refusal comes before any write, and
    /dev/null (and /dev) are left exactly as they were. A symlink to it is refused the same way."""
    dev_null = Path("/dev/null")
    if not stat.S_ISCHR(os.lstat(dev_null).st_mode):
        pytest.skip("/dev/null is not a character device here")
    before = os.lstat(dev_null)
    flag = ["--force"] if force else []
    assert_refused(run_cli("merge", BASE_FOLDER, ADAPTER, "-o", dev_null, *flag), None, "character device")
    assert_refused(run_cli("merge", BASE_FILE, ADAPTER, "-o", dev_null, *flag), None, "character device")
    link = tmp_path / "null.safetensors"
    link.symlink_to(dev_null)
    assert_refused(run_cli("merge", BASE_FILE, ADAPTER, "-o", link, *flag), None, "symlink to a character device")
    assert link.is_symlink() and os.readlink(link) == str(dev_null)
    after = os.lstat(dev_null)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert not [name for name in os.listdir("/dev") if TEMP_MARK in name]
    # The context manager itself refuses before it creates anything (no lock file in /dev).
    with pytest.raises(OutputPathError, match="character device"):
        with atomic_output(dev_null, is_folder=False, force=True):
            raise AssertionError("never reached")
    assert not [name for name in os.listdir("/dev") if TEMP_MARK in name]


def test_a_symlink_at_out_is_replaced_itself_never_its_target(run_cli, tmp_path, reference):
    target = tmp_path / "precious.safetensors"
    target.write_bytes(b"not a model")
    link = tmp_path / "out.safetensors"
    link.symlink_to(target)
    assert_refused(run_cli("merge", BASE_FILE, ADAPTER, "-o", link), None, "already exists", "--force")
    ok(run_cli("merge", BASE_FILE, ADAPTER, "-o", link, "--force"))
    assert target.read_bytes() == b"not a model"
    assert not link.is_symlink() and same_tensors(link, reference)
    assert leftovers(tmp_path) == []


# --- two runs, one OUT ----------------------------------------------------------------------------------


def test_a_run_holding_the_lock_makes_another_refuse(run_cli, tmp_path, reference):
    import fcntl

    out = tmp_path / "out.safetensors"
    lock = tmp_path / f".{out.name}{LOCK_SUFFIX}"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # flock is per open file: this process's own run conflicts with it
    try:
        line = assert_refused(run_cli("merge", BASE_FILE, ADAPTER, "-o", out), None, "another loratool run",
                              "pid 4242")
        assert str(out) in line and not out.exists()
        assert leftovers(tmp_path) == [lock.name]  # someone else's lock is not ours to remove
    finally:
        os.close(fd)
    # A lock file left by a run that was killed holds no flock: the next run takes it over and removes it.
    assert lock.exists()
    ok(run_cli("merge", BASE_FILE, ADAPTER, "-o", out))
    assert same_tensors(out, reference) and leftovers(tmp_path) == []


@pytest.mark.parametrize("when", ["before-writing", "before-the-rename"])
def test_an_out_published_meanwhile_is_never_replaced(run_cli, tmp_path, monkeypatch, when):
    """OUT was free when the command checked it; another run published it before this one took the lock,
    or (a program that takes no lock) before the rename. Either way it is refused, and theirs stays."""
    out = tmp_path / "out.safetensors"
    real_lock, real_durable = output._lock, output.make_durable

    def publish_theirs():
        out.write_bytes(b"theirs")

    if when == "before-writing":
        monkeypatch.setattr(output, "_lock", lambda path: (publish_theirs(), real_lock(path))[1])
    else:
        monkeypatch.setattr(output, "make_durable", lambda path: (real_durable(path), publish_theirs()))
    assert_refused(run_cli("merge", BASE_FILE, ADAPTER, "-o", out), None, "already exists", "--force")
    assert out.read_bytes() == b"theirs"
    assert leftovers(tmp_path) == []


def test_two_concurrent_runs_to_one_new_out(tmp_path, reference):
    """Two real merges started together: exactly one writes OUT, the other refuses with one line. Which
    one wins, and whether the loser is stopped by the lock or by the finished OUT, depends on timing;
    the outcome does not."""
    for round_ in range(2):
        out = tmp_path / f"out{round_}.safetensors"
        argv = [sys.executable, "-m", "loratool", "merge", str(BASE_FILE), str(ADAPTER), "-o", str(out)]
        runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
                for _ in range(2)]
        results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 2], results
        refusal = next(stderr for code, _, stderr in results if code == 2)
        lines = refusal.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), refusal
        assert "another loratool run" in lines[0] or "already exists" in lines[0], refusal
        assert same_tensors(out, reference)
        assert leftovers(tmp_path) == []


# --- interrupts around the rename -----------------------------------------------------------------------


def signal_at_rename(monkeypatch, when):
    """Wrap os.replace so that SIGTERM arrives right after the rename `when(src, dst)` picks."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if when(Path(src), Path(dst)):
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(output.os, "replace", replace)


def test_interrupt_right_after_the_rename_says_the_output_is_in_place(run_cli, tmp_path, monkeypatch, reference):
    out = tmp_path / "out.safetensors"
    signal_at_rename(monkeypatch, lambda src, dst: dst == out)
    result = run_cli("merge", BASE_FILE, ADAPTER, "-o", out)
    assert result.code == 130, result
    assert result.stderr.strip().splitlines() == [f"Error: interrupted after writing; the complete output is in "
                                                  f"place at {out}"], result
    assert same_tensors(out, reference) and leftovers(tmp_path) == []


def test_interrupt_during_the_force_swap_leaves_no_hidden_copy(run_cli, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    # The signal comes between moving the old OUT aside and renaming the new one in.
    signal_at_rename(monkeypatch, lambda src, dst: src == out)
    result = run_cli("merge", BASE_FOLDER, ADAPTER, "-o", out, "--force")
    assert result.code == 130, result
    assert "the complete output is in place" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_a_failed_force_swap_puts_the_old_output_back(run_cli, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == out and "-old-" not in Path(src).name and not os.path.lexists(out):
            raise OSError(28, "No space left on device", str(src))  # the second rename of the swap fails
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(output.os, "replace", replace)
    result = run_cli("merge", BASE_FOLDER, ADAPTER, "-o", out, "--force")
    assert_refused(result, None, "No space left")
    assert (out / "old.txt").read_text() == "the previous output"
    assert leftovers(tmp_path) == []


def test_api_interrupt_in_the_swap_without_handlers_restores(tmp_path, monkeypatch):
    """From Python (no loratool signal handlers), a KeyboardInterrupt between the swap's two renames still
    puts the old OUT back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == out and "-old-" not in Path(src).name and not os.path.lexists(out):
            raise KeyboardInterrupt  # the new output's rename, after the old one was moved aside
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, is_folder=True, force=True) as temp:
            (temp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["old.txt"] and leftovers(tmp_path) == []


# A child that stops at a known point (make_durable, just before the rename) and signals itself from a
# thread, `count` SIGTERMs 20 ms apart; `stubborn` keeps the main thread there (code that swallows the
# first KeyboardInterrupt), so the third signal makes the process leave at once through the cleanups.
CHILD = r"""
import os, signal, sys, threading, time
from loratool import interrupts
interrupts.install()
import loratool.checkpoint.output as output
count, stubborn, slow_cleanup = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
real_remove = output._remove

def shoot():
    for _ in range(count):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.02)

def make_durable(path):
    threading.Thread(target=shoot, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            if not stubborn:
                raise
    raise SystemExit("never interrupted")

def remove(path):
    if slow_cleanup:
        time.sleep(0.2)  # the later signals arrive while the temp folder is being removed
    real_remove(path)

output.make_durable = make_durable
output._remove = remove
from loratool.cli import main
code = main(sys.argv[4:])
interrupts.leave(code)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("count, stubborn, slow_cleanup", [(1, False, False), (3, False, True), (5, False, True),
                                                            (3, True, False), (5, True, False)],
                         ids=["one", "three-during-cleanup", "five-during-cleanup", "three-stubborn",
                              "five-stubborn"])
def test_sigterms_20ms_apart_leave_no_temp_folder(tmp_path, count, stubborn, slow_cleanup):
    out = tmp_path / "new" / "deeper" / "out"
    argv = [sys.executable, "-c", CHILD, str(count), str(int(stubborn)), str(int(slow_cleanup)),
            "merge", str(BASE_FOLDER), str(ADAPTER), "-o", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=300)
    assert result.returncode == 130, result
    assert result.stderr.strip().splitlines() == [interrupts.MESSAGE], result
    assert sorted(os.listdir(tmp_path)) == []  # no OUT, no temp folder, no lock file, no folders -o made


# --- folders that -o made --------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [None, "a", "a/b"])
def test_folders_made_for_out_are_removed_on_failure(tmp_path, existing):
    from loratool import merge

    if existing:
        (tmp_path / existing).mkdir(parents=True)

    def fail(done, total):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(BASE_FOLDER, [ADAPTER], tmp_path / "a" / "b" / "c" / "out", progress=fail)
    expected = {None: [], "a": ["a"], "a/b": ["a", "a/b"]}[existing]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == expected


def test_folders_made_for_out_stay_on_success(run_cli, tmp_path):
    out = tmp_path / "a" / "b" / "out.safetensors"
    ok(run_cli("merge", BASE_FILE, ADAPTER, "-o", out))
    assert out.is_file() and leftovers(out.parent) == []


def test_a_refused_lock_removes_the_folders_it_made(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_lock", lambda out: (_ for _ in ()).throw(OutputPathError("busy")))
    with pytest.raises(OutputPathError):
        with atomic_output(tmp_path / "x" / "y" / "out", is_folder=True):
            raise AssertionError("never reached")
    assert os.listdir(tmp_path) == []


# --- copies out of pipeline folders ----------------------------------------------------------------------


@pytest.fixture
def pipeline(tmp_path):
    """A pipeline folder with one LoRA-adaptable component (a tiny CLIP text encoder) and a scheduler
    folder that is copied as it is, and a kohya LoRA for the text encoder."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path / "pipeline"
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=50, max_position_embeddings=16, projection_dim=8, bos_token_id=0,
                            eos_token_id=2, pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "PNDMScheduler"}')
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "PNDMScheduler"]}))
    generator = torch.Generator().manual_seed(1)
    name = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8, generator=generator),
               f"{name}.lora_up.weight": torch.randn(8, 2, generator=generator),
               f"{name}.alpha": torch.tensor(2.0)}, str(tmp_path / "lora.safetensors"))
    return folder


def test_pipeline_symlinks_to_regular_files_are_copied_as_files(run_cli, tmp_path, pipeline):
    """A Hugging Face cache snapshot is made of symlinks to blobs: their contents are copied."""
    blob = tmp_path / "blob"
    blob.write_text('{"scheduler": "from a blob"}')
    (pipeline / "scheduler" / "extra.json").symlink_to(blob)
    out = tmp_path / "out"
    ok(run_cli("merge", pipeline, tmp_path / "lora.safetensors", "-o", out))
    copied = out / "scheduler" / "extra.json"
    assert not copied.is_symlink() and copied.read_text() == '{"scheduler": "from a blob"}'
    assert (out / "scheduler" / "scheduler_config.json").read_text() == '{"_class_name": "PNDMScheduler"}'
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("entry, words", [
    ("zero", "character device"), ("fifo", "FIFO"), ("socket", "socket"), ("broken", "broken symlink"),
    ("loop", "folder above it"), ("component-fifo", "FIFO")])
def test_pipeline_entries_that_are_not_regular_files_are_refused(run_cli, tmp_path, pipeline, entry, words):
    """A symlink to /dev/zero would be copied until the disk is full and a FIFO would block forever: each
    is refused with one line naming it, before any byte of it is read, and nothing is written."""
    keep = None
    where = pipeline / "scheduler" / "bad"
    if entry == "zero":
        where.symlink_to("/dev/zero")
    elif entry == "fifo":
        os.mkfifo(where)
    elif entry == "socket":
        keep = make_special("socket", where)
    elif entry == "broken":
        where.symlink_to(tmp_path / "nowhere")
    elif entry == "loop":
        where.symlink_to(pipeline / "scheduler")
    else:
        where = pipeline / "text_encoder" / "bad"
        os.mkfifo(where)
    try:
        out = tmp_path / "out"
        assert_refused(run_cli("merge", pipeline, tmp_path / "lora.safetensors", "-o", out), out, words, "bad")
        assert leftovers(tmp_path) == []
    finally:
        if keep is not None:
            keep.close()


def test_a_copy_takes_at_most_the_size_its_stat_gave(tmp_path, monkeypatch):
    """The bound: a file that grows while it is copied is copied up to the size stat gave when the copy
    began (a shrinking one is refused). Simulated by a stat that reports less, then more, than is there."""
    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    real = os.fstat

    class Reported:
        def __init__(self, info, size):
            self._info, self.st_size = info, size

        def __getattr__(self, name):
            return getattr(self._info, name)

    def fstat_reporting(size):
        def fstat(fd):
            info = real(fd)
            return Reported(info, size) if stat.S_ISREG(info.st_mode) and info.st_size == 10240 else info
        return fstat

    monkeypatch.setattr(output.os, "fstat", fstat_reporting(1000))
    copy_regular_file(source, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()[:1000]
    monkeypatch.setattr(output.os, "fstat", fstat_reporting(20000))
    with pytest.raises(InvalidCheckpointError, match="shrank"):
        copy_regular_file(source, tmp_path / "copy2")


def test_copy_regular_keeps_contents_modes_and_times(tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "sub" / "b.bin").write_bytes(os.urandom(3 << 20))
    os.chmod(source / "a.txt", 0o640)
    os.utime(source / "a.txt", ns=(1_000_000_000, 2_000_000_000))
    copy_regular(source, tmp_path / "dst")
    assert (tmp_path / "dst" / "a.txt").read_text() == "a"
    assert (tmp_path / "dst" / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()
    copied = os.stat(tmp_path / "dst" / "a.txt")
    assert stat.S_IMODE(copied.st_mode) == 0o640 and copied.st_mtime_ns == 2_000_000_000
