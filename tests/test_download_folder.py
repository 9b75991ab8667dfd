"""The model card's command in a download folder: `loratool merge base.safetensors adapter_model.safetensors`
run inside the folder that holds the base, `adapter_model.safetensors` and `adapter_config.json`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from helpers import assert_refused, make_adapter, ok, tiny_llama

ROOT = Path(__file__).parent.parent


def _loratool() -> list[str]:
    script = Path(sys.executable).parent / "loratool"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "loratool"]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORATOOL_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # this worktree's
    env.pop("LORATOOL_DEBUG", None)
    return subprocess.run([*_loratool(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    """A folder as `hf download` leaves it: the base as one file, and a PEFT adapter beside it."""
    folder = tmp_path_factory.mktemp("dl") / "my_lora"
    folder.mkdir()
    model = tiny_llama()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "base.safetensors"))
    make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), folder)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    return folder


def _expected(folder: Path) -> dict[str, torch.Tensor]:
    """W + s·B@A in float64, from the files themselves."""
    base = {k: v.double() for k, v in load_file(str(folder / "base.safetensors")).items()}
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        base[name] = base[name] + scale * (b.double() @ a.double())
    return base


def test_card_command_in_download_folder(download, tmp_path):
    folder = tmp_path / "my_lora"
    shutil.copytree(download, folder)
    before = sorted(p.name for p in folder.iterdir())
    result = _run(folder, "merge", "base.safetensors", "adapter_model.safetensors")
    assert result.returncode == 0, result.stderr
    out = folder / "base+my_lora.safetensors"
    assert out.is_file(), sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*before, out.name])
    assert out.name in result.stdout
    merged, expected = load_file(str(out)), _expected(folder)
    assert merged.keys() == expected.keys()
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
        changed += not torch.equal(tensor, load_file(str(folder / "base.safetensors"))[name])
    assert changed == 4  # q_proj and v_proj in both layers


def test_overwriting_the_adapter_is_refused(download, tmp_path, run_cli, monkeypatch):
    folder = tmp_path / "my_lora"
    shutil.copytree(download, folder)
    stamp = (folder / "adapter_model.safetensors").read_bytes()
    monkeypatch.chdir(folder)  # in-process, through the same error boundary as the console script
    refused = run_cli("merge", "base.safetensors", "adapter_model.safetensors", "-o", "adapter_model.safetensors")
    assert "is, or lies inside, the input adapter_model.safetensors" in assert_refused(refused)
    for target in ("adapter_model.safetensors", "adapter_config.json", "base.safetensors", "."):
        for force in ([], ["--force"]):
            refused = run_cli("merge", "base.safetensors", "adapter_model.safetensors", "-o", target, *force)
            assert_refused(refused, None, "input")
    assert (folder / "adapter_model.safetensors").read_bytes() == stamp
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in download.iterdir())


def test_default_name_uses_real_names(download, tmp_path, monkeypatch):
    from loratool.api.merge import default_output

    monkeypatch.chdir(download)
    assert default_output(Path("base.safetensors"), [Path(".")]).name == "base+my_lora.safetensors"
    assert default_output(Path("base.safetensors"), [Path("../my_lora/")], tmp_path).name == "base+my_lora.safetensors"
    kohya = tmp_path / "style.safetensors"
    kohya.write_bytes(b"")
    assert default_output(Path("base.safetensors"), [kohya], tmp_path).name == "base+style.safetensors"
    monkeypatch.chdir("/")
    assert default_output(Path("/"), [Path(".")], tmp_path).name == "base+adapter"


def test_output_is_judged_against_what_is_read(download, tmp_path):
    from loratool.checkpoint.output import check_output_path, read_paths
    from loratool.errors import OutputPathError

    weights, config = download / "adapter_model.safetensors", download / "adapter_config.json"
    read = read_paths(weights, download)  # a PEFT file is read with the config beside it, not as its folder
    assert read == [weights, config]
    check_output_path(download / "new.safetensors", read, force=False)
    for refused in (weights, config, download, download.parent):
        with pytest.raises(OutputPathError):
            check_output_path(refused, read, force=True)
    assert read_paths(download, download) == [download]  # a folder the user named is read as a whole
    with pytest.raises(OutputPathError, match="lies inside"):
        check_output_path(download / "new.safetensors", read_paths(download, download), force=False)
    kohya = download / "base.safetensors"
    assert read_paths(kohya, kohya) == [kohya]
    assert read_paths(object(), download) == [download]  # an Adapter passed from Python: its path, whole


def test_every_command_writes_beside_a_one_file_adapter(download, tmp_path, run_cli, monkeypatch):
    """resize, convert and combine judge OUT against what they read, as merge does: a new output in the
    download folder is fine, the adapter's own files are not."""
    folder = tmp_path / "my_lora"
    shutil.copytree(download, folder)
    monkeypatch.chdir(folder)
    ok(run_cli("resize", "adapter_model.safetensors", "--rank", "1", "-o", "resized"))
    ok(run_cli("convert", "adapter_model.safetensors", "--to", "kohya", "-o", "kohya.safetensors"))
    ok(run_cli("combine", "adapter_model.safetensors", "resized", "--method", "cat", "-o", "both"))
    for args in (["resize", "adapter_model.safetensors", "--rank", "1", "-o", "."],
                 ["convert", "adapter_model.safetensors", "--to", "kohya", "-o", "adapter_model.safetensors"],
                 ["combine", "adapter_model.safetensors", "resized", "--method", "cat", "-o", "resized"]):
        assert_refused(run_cli(*args, "--force"), None, "input")
