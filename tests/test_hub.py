"""`push`, `pull` and `hf://` over real HTTP against a local Hub-compatible server (tests/hub_server.py)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from helpers import assert_refused, load_folder, ok
from hub_server import FakeHub

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOKEN = "hf_test_token_do_not_print"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub(token=TOKEN, user="tester")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # huggingface_hub reads these once at import; the tests need them per test.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True, raising=False)
    yield server
    server.close()


def test_push_then_pull_is_byte_identical(run_cli, hub, tmp_path):
    pushed = ok(run_cli("push", FIXTURES / "lora-llama", "tester/lora"))
    assert f"{hub.url}/tester/lora/commit/" in pushed.stdout
    assert sorted(hub.files("tester/lora")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    ok(run_cli("pull", "tester/lora", "-o", tmp_path / "pulled"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "pulled" / name).read_bytes() == (FIXTURES / "lora-llama" / name).read_bytes()
    assert not (tmp_path / "pulled" / ".cache").exists()
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(FIXTURES / "tiny-llama"), str(tmp_path / "pulled"))


def test_model_card_yaml_round_trips_and_passes_validation(run_cli, hub):
    ok(run_cli("push", FIXTURES / "lora-llama-qv", "tester/qv", "--card-overwrite", "--base-model",
               "meta-llama/Llama-3.2-1B"))
    card = ModelCard(hub.files("tester/qv")["README.md"].decode())
    assert card.data.base_model == "meta-llama/Llama-3.2-1B" and card.data.library_name == "peft"
    assert {"lora", "loratool", "base_model:adapter:meta-llama/Llama-3.2-1B"} <= set(card.data.tags)
    assert "| rank r | 2, 4 |" in card.text and "PeftModel.from_pretrained" in card.text
    # upload_folder had the server validate the README's YAML; and huggingface_hub's own ModelCard check:
    assert any(path == "/api/validate-yaml" for _, path, _ in hub.state.requests)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        card.validate()
    # the folder's own README is kept unless asked otherwise
    ok(run_cli("push", FIXTURES / "lora-llama", "tester/keep"))
    assert hub.files("tester/keep")["README.md"] == (FIXTURES / "lora-llama" / "README.md").read_bytes()


def test_private_repos_and_branches(run_cli, hub, tmp_path, monkeypatch):
    ok(run_cli("push", FIXTURES / "lora-llama", "tester/secret", "--private", "--revision", "dev",
               "--message", "first"))
    repo = hub.state.repos["tester/secret"]
    assert repo.private and repo.commits[-1]["summary"] == "first" and repo.commits[-1]["revision"] == "dev"
    assert "adapter_config.json" in hub.files("tester/secret", "dev") and not hub.files("tester/secret", "main")
    ok(run_cli("pull", "tester/secret", "--revision", "dev", "-o", tmp_path / "a"))
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    hidden = run_cli("pull", "tester/secret", "--revision", "dev", "-o", tmp_path / "b")
    assert hidden.code == 2 and not (tmp_path / "b").exists()


def test_token_never_appears_in_output_or_logs(run_cli, hub, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    results = [run_cli("push", FIXTURES / "lora-llama", "tester/t", "--json"),
               run_cli("pull", "tester/t", "-o", tmp_path / "p", "--json"),
               run_cli("--debug", "push", FIXTURES / "lora-llama", "someone-else/t")]
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_also_secret")
    results.append(run_cli("--debug", "push", FIXTURES / "lora-llama", "tester/t2"))
    for result in results:
        for secret in (TOKEN, "hf_wrong_token_also_secret"):
            assert secret not in result.stdout and secret not in result.stderr
    assert TOKEN not in caplog.text and "hf_wrong_token_also_secret" not in caplog.text
    for path in (tmp_path / "p").rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()


@pytest.mark.parametrize("case, message", [
    ("bad-token", "401"),
    ("other-owner", "403"),
    ("server-error", "500"),
    ("refused", "cannot reach the Hub"),
    ("no-token", "no Hugging Face token"),
])
def test_hub_errors_are_one_clean_line(run_cli, hub, monkeypatch, case, message):
    repo = "tester/e"
    if case == "bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    elif case == "other-owner":
        repo = "someone-else/e"
    elif case == "server-error":
        hub.state.failures[r"/commit/"] = 500
    elif case == "refused":
        closed = hub.url
        hub.close()
        monkeypatch.setenv("HF_ENDPOINT", closed)
    elif case == "no-token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = run_cli("push", FIXTURES / "lora-llama", repo)
    assert result.code == 2, result
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_touches_no_network(run_cli, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    result = ok(run_cli("push", FIXTURES / "lora-llama-qv", "tester/dry", "--dry-run", "--card-overwrite"))
    assert "adapter_model.safetensors" in result.stdout and "library_name: peft" in result.stdout
    assert not hub.state.requests


def test_pickle_adapters_are_converted_never_uploaded(run_cli, hub, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(FIXTURES / "lora-llama-qv" / "adapter_config.json", folder)
    state = load_file(str(FIXTURES / "lora-llama-qv" / "adapter_model.safetensors"))
    torch.save(state, folder / "adapter_model.bin")
    refused = run_cli("push", folder, "tester/p")
    assert refused.code == 2 and "pickle" in refused.stderr.lower()
    ok(run_cli("push", folder, "tester/p", "--allow-pickle"))
    files = hub.files("tester/p")
    assert "adapter_model.bin" not in files and "adapter_model.safetensors" in files


def test_hf_locations_in_merge(run_cli, hub, tmp_path):
    ok(run_cli("push", FIXTURES / "lora-llama", "tester/lora"))
    api = huggingface_hub.HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("tester/base")
    api.upload_folder(repo_id="tester/base", folder_path=str(FIXTURES / "tiny-llama"))
    ok(run_cli("merge", "hf://tester/base", "hf://tester/lora@main", "-o", tmp_path / "remote"))
    ok(run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", tmp_path / "local"))
    remote, local = load_folder(tmp_path / "remote"), load_folder(tmp_path / "local")
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["model_type"] == "llama"
    bad = run_cli("inspect", "hf://not a repo")
    assert bad.code == 2 and "not a Hub location" in bad.stderr
    missing = run_cli("inspect", "hf://tester/nothing-here")
    assert missing.code == 2 and "tester/nothing-here" in missing.stderr
    invalid = run_cli("pull", "bad//id", "-o", tmp_path / "pulled")  # huggingface_hub's own validation
    assert invalid.code == 2 and "bad//id" in invalid.stderr and "unexpected" not in invalid.stderr, invalid
    assert_refused(run_cli("extract", tmp_path / "missing", "-o", tmp_path / "x"), None, "no such file")
