"""`inspect`: documented JSON keys, adapter facts, and checks on the committed fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from helpers import load_folder

FIXTURES = Path(__file__).parent.parent / "fixtures"
CHECKPOINT_KEYS = {"schema", "kind", "path", "format", "sharded", "files", "tensors", "parameters", "bytes", "dtypes",
                   "metadata", "model_type", "architectures", "embedded_adapter", "layout", "family", "components"}
ADAPTER_KEYS = {"schema", "kind", "path", "format", "base_model", "peft_version", "task_type", "r", "lora_alpha",
                "lora_alpha_known", "family", "family_from", "use_rslora", "use_dora", "modules", "targets", "layers", "groups", "rank_pattern", "alpha_pattern",
                "modules_to_save", "tensors", "parameters", "bytes", "dtypes"}


def test_checkpoint_json(run_cli):
    result = run_cli("inspect", FIXTURES / "tiny-llama", "--json", "--tensors")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    assert CHECKPOINT_KEYS | {"tensor_list"} == set(report)
    state = load_file(FIXTURES / "tiny-llama" / "model.safetensors")
    assert report["tensors"] == len(state)
    assert report["parameters"] == sum(t.numel() for t in state.values())
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert report["dtypes"] == {"F32": {"tensors": len(state), "parameters": report["parameters"],
                                        "bytes": report["bytes"]}}
    assert report["model_type"] == "llama"
    assert (report["layout"], report["family"], report["components"]) == (
        "transformers", "LlamaForCausalLM", {"model": "transformers"})
    assert {t["name"] for t in report["tensor_list"]} == set(state)


def test_adapter_json(run_cli):
    report = json.loads(run_cli("inspect", FIXTURES / "lora-llama-qv", "--json").stdout)
    assert ADAPTER_KEYS == set(report)
    assert report["base_model"] == "fixtures/tiny-llama"
    assert report["targets"] == ["q_proj", "v_proj"] and report["layers"] == [0, 1]
    groups = {g["target"]: g for g in report["groups"]}
    assert groups["v_proj"]["rank"] == 2 and groups["q_proj"]["rank"] == 4
    assert groups["q_proj"]["scale"] == 8 / 2.0  # rsLoRA: alpha / sqrt(r)
    assert report["use_rslora"] is True and report["use_dora"] is False


def test_human_output_and_check(run_cli):
    result = run_cli("inspect", FIXTURES / "lora-llama", "--check")
    assert result.code == 0, result
    assert "q_proj" in result.stdout and "all values finite" in result.stdout


def test_fixtures_are_real_peft_adapters(run_cli, tmp_path):
    """The committed fixtures load in PEFT, and merging them equals PEFT's merge."""
    base = FIXTURES / "tiny-llama"
    result = run_cli("merge", base, FIXTURES / "lora-llama", "-o", tmp_path / "out")
    assert result.code == 0, result
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), FIXTURES / "lora-llama")
    oracle = model.merge_and_unload().state_dict()
    ours = load_folder(tmp_path / "out")
    assert max((ours[k] - oracle[k]).abs().max().item() for k in ours) <= 1e-6
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"], load_folder(base)["model.layers.0.mlp.up_proj.weight"])


def test_model_folder_with_an_adapter_subfolder_is_a_model(run_cli, tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "tiny-llama", tmp_path / "model")
    shutil.copytree(FIXTURES / "lora-llama", tmp_path / "model" / "lora")
    assert json.loads(run_cli("inspect", tmp_path / "model", "--json").stdout)["kind"] == "checkpoint"
    assert json.loads(run_cli("inspect", tmp_path / "model" / "lora", "--json").stdout)["kind"] == "adapter"
