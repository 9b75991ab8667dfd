"""`inspect`: documented JSON keys, adapter facts, and checks on the committed fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from helpers import assert_unbroken, load_folder

FIXTURES = Path(__file__).parent.parent / "fixtures"
CHECKPOINT_KEYS = {"schema", "kind", "path", "format", "sharded", "files", "tensors", "parameters", "bytes", "dtypes",
                   "metadata", "model_type", "architectures", "embedded_adapter", "layout", "family", "variant",
                   "components"}
ADAPTER_KEYS = {"schema", "kind", "path", "format", "base_model", "peft_version", "task_type", "r", "lora_alpha",
                "lora_alpha_known", "family", "family_from", "use_rslora", "use_dora", "modules", "algorithms", "targets", "layers", "groups", "rank_pattern", "alpha_pattern",
                "modules_to_save", "tensors", "parameters", "bytes", "dtypes"}

GROUP_KEYS = {"target", "kind", "rank", "alpha", "scale", "dora", "modules", "algorithm", "tucker", "factor", "parameters"}


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
    assert set(groups["q_proj"]) == GROUP_KEYS
    assert report["algorithms"] == {"lora": report["modules"]}
    assert groups["v_proj"]["rank"] == 2 and groups["q_proj"]["rank"] == 4
    assert (groups["q_proj"]["algorithm"], groups["q_proj"]["tucker"], groups["q_proj"]["factor"]) == ("lora", False, None)
    state = load_file(FIXTURES / "lora-llama-qv" / "adapter_model.safetensors")
    assert sum(g["parameters"] for g in report["groups"]) == sum(t.numel() for t in state.values())
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


# -- kohya files, and the 80-column tables -------------------------------------------------------------

#: kohya module -> (in, out) features, with the target inspect names it by: an SD1 LoRA as sd-scripts
#: writes it (diffusers UNet names, CLIP text encoder), and as older trainers do (LDM UNet names).
KOHYA_SD1 = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((32, 32), "proj_in"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((32, 32), "attn1.to_q"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": ((32, 32), "attn1.to_out.0"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((24, 32), "attn2.to_k"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": ((32, 64), "ff.net.0.proj"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": ((32, 32), "ff.net.2"),
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": ((40, 32), "time_emb_proj"),
    "lora_unet_mid_block_attentions_0_proj_out": ((32, 32), "proj_out"),
    "lora_unet_input_blocks_1_1_proj_in": ((32, 32), "proj_in"),
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v": ((24, 32), "attn2.to_v"),
    "lora_unet_output_blocks_3_0_emb_layers_1": ((40, 32), "emb_layers.1"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((24, 24), "self_attn.q_proj"),
    "lora_te_text_model_encoder_layers_11_mlp_fc1": ((24, 48), "mlp.fc1"),
}


def kohya_file(path: Path, modules: dict, ranks=None, alpha: float = 2.0) -> Path:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for index, (name, ((features_in, features_out), _)) in enumerate(modules.items()):
        rank = ranks[index % len(ranks)] if ranks else 4
        state[f"{name}.lora_down.weight"] = torch.randn(rank, features_in, generator=generator) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(features_out, rank, generator=generator) * 0.1
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), {"ss_base_model_version": "sd_v1"})
    return path


def test_kohya_targets_are_named_in_the_base_terms(run_cli, tmp_path):
    report = json.loads(run_cli("inspect", kohya_file(tmp_path / "sd1.safetensors", KOHYA_SD1), "--json").stdout)
    expected = sorted({target for _, target in KOHYA_SD1.values()})
    assert report["targets"] == expected == sorted(g["target"] for g in report["groups"])
    assert {g["target"]: g["modules"] for g in report["groups"]}["proj_in"] == 2  # both UNet namings
    assert (report["r"], report["lora_alpha"], report["lora_alpha_known"]) == (4, 2.0, True)  # the same in every module
    mixed = json.loads(run_cli("inspect", kohya_file(tmp_path / "mixed.safetensors", KOHYA_SD1, ranks=[4, 8]),
                               "--json").stdout)
    assert (mixed["r"], mixed["lora_alpha"]) == (None, 2.0)
    human = run_cli("inspect", tmp_path / "mixed.safetensors").stdout
    assert "per target / 2" in " ".join(human.split())
    assert "None" not in human


def test_tables_fit_80_columns_without_breaking_a_word(run_cli, tmp_path, monkeypatch):
    from rich.console import Console

    from loratool.cli.inspect_cmd import _groups

    monkeypatch.setenv("COLUMNS", "80")
    headers = ["target", "algorithm", "kind", "modules", "rank", "alpha", "scale"]
    result = run_cli("inspect", kohya_file(tmp_path / "sd1.safetensors", KOHYA_SD1))
    assert result.code == 0, result
    assert_unbroken(result.stdout, [*headers, *(target for _, target in KOHYA_SD1.values())])
    result = run_cli("inspect", FIXTURES / "lora-llama", "--tensors")
    assert_unbroken(result.stdout, [*headers, "model.layers.0.self_attn.q_proj.lora_A"])

    # LyCORIS, DoRA and a long name together: the borders go before any word is split, and only a
    # target longer than what is left is folded.
    def group(target, algorithm, kind="linear", tucker=False, factor=None, dora=False):
        return dict(target=target, algorithm=algorithm, kind=kind, tucker=tucker, factor=factor, dora=dora,
                    modules=12, rank=4, alpha=2.0, scale=0.5, parameters=1234567)

    cases = [
        ([group("attn2.to_k", "locon", tucker=True), group("self_attn.out_proj", "lokr", factor=[4, 8])], True),
        ([group("time_embedding.linear_1", "locon", "conv", tucker=True, dora=True),
          group("attn1.to_out.0", "lokr", "embedding", factor=[16, 16]), group("ff.net.0.proj", "loha", tucker=True)],
         False),
    ]
    for groups, whole in cases:
        console = Console(width=80, record=True)
        with console.capture() as capture:
            console.print(_groups({"groups": groups}, 80))
        text = capture.get()
        words = [*headers, "DoRA" if any(g["dora"] for g in groups) else "params", "1,234,567", "Tucker",
                 *(g["kind"] for g in groups)]
        assert_unbroken(text, words + [g["target"] for g in groups] if whole else words)
