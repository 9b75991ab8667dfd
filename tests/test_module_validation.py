"""Each adapter module checks its own tensors and scale before any math, and every command gives the
same one-line refusal for the same bad module (issue 19, items 1 and 2). The property suite
(test_contract_properties.py) covers merge and convert over every algorithm and dialect; these pin the
other commands and the readers' edges."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from helpers import FIXTURES, assert_refused

NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"


def kohya_file(path, **overrides):
    tensors = {f"{NAME}.lora_down.weight": torch.randn(2, 8), f"{NAME}.lora_up.weight": torch.randn(8, 2),
               f"{NAME}.alpha": torch.tensor(2.0)}
    tensors.update({f"{NAME}.{role}": t for role, t in overrides.items()})
    save_file(tensors, str(path))
    return path


CASES = {
    "nan alpha": ({"alpha": torch.tensor(math.nan)}, "not a finite number"),
    "inf alpha": ({"alpha": torch.tensor(math.inf)}, "not a finite number"),
    "huge alpha": ({"alpha": torch.tensor(1e30)}, "scale"),
    "fp8 alpha": ({"alpha": torch.tensor(2.0).to(torch.float8_e4m3fn)}, ".alpha is stored as"),
    "fp8 factor": ({"lora_up.weight": torch.randn(8, 2).to(torch.float8_e4m3fn)}, "float8"),
    "int factor": ({"lora_up.weight": torch.ones(8, 2, dtype=torch.int32)}, "not a float tensor"),
    "0-dim factor": ({"lora_down.weight": torch.tensor(1.0)}, "0-dim"),
    "rank 0": ({"lora_down.weight": torch.zeros(0, 8), "lora_up.weight": torch.zeros(8, 0)}, "empty"),
    "0-dim dora_scale": ({"dora_scale": torch.tensor(1.0)}, "0-dim"),
    "empty dora_scale": ({"dora_scale": torch.zeros(0)}, "empty"),
    "mismatched rank": ({"lora_up.weight": torch.randn(8, 3)}, "do not form a product"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_command_refuses_a_bad_module_in_one_line(run_cli, tmp_path, case):
    overrides, needle = CASES[case]
    adapter = kohya_file(tmp_path / "bad.safetensors", **overrides)
    good = kohya_file(tmp_path / "good.safetensors")
    out = tmp_path / "out"
    for args in (["inspect", adapter], ["inspect", adapter, "--json", "--check"],
                 ["resize", adapter, "--rank", "1", "-o", out],
                 ["combine", adapter, good, "--method", "svd", "--rank", "2", "-o", out],
                 ["convert", adapter, "--to", "kohya", "-o", out.with_suffix(".safetensors")]):
        result = run_cli(*args)
        line = assert_refused(result, out, NAME.removeprefix("lora_unet_") if "inspect" in args else needle)
        assert needle in line, (args, line)
        if "--json" in args:  # an error object, and strict JSON: no bare NaN or Infinity
            assert json.loads(result.stdout, parse_constant=pytest.fail)["error"] == line.removeprefix("Error: ")


def test_bare_peft_weights_with_a_nan_alpha_are_refused(run_cli, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2)},
              str(folder / "adapter_model.safetensors"))
    out = tmp_path / "m"
    for alpha in ("nan", "inf", "-inf"):
        assert_refused(run_cli("merge", FIXTURES / "tiny-llama", folder / "adapter_model.safetensors", "--alpha", alpha,
                               "-o", out), out, "alpha")


def test_an_unknown_tensor_in_a_peft_loha_folder_is_refused_by_every_command(run_cli, tmp_path):
    """It used to be carried into resize's output as a whole tensor, while merge and convert refused it."""
    folder = tmp_path / "loha"
    folder.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    tensors = {prefix + role: torch.randn(shape) for role, shape in
               (("hada_w1_a", (64, 2)), ("hada_w1_b", (2, 64)), ("hada_w2_a", (64, 2)), ("hada_w2_b", (2, 64)))}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 2,
                                                            "target_modules": ["q_proj"]}))
    base = FIXTURES / "tiny-llama"
    assert run_cli("resize", folder, "--base", base, "--rank", "1", "-o", tmp_path / "ok").code == 0
    tensors[prefix + "hada_w3_a"] = torch.randn(64, 2)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    out = tmp_path / "out"
    for args in (["resize", folder, "--base", base, "--rank", "1", "-o", out], ["merge", base, folder, "-o", out],
                 ["convert", folder, "--to", "kohya", "-o", out.with_suffix(".safetensors")]):
        assert_refused(run_cli(*args), out, "hada_w3_a")


def test_a_fused_lora_with_the_wrong_row_count_is_refused(run_cli, tmp_path):
    """97 rows against a 96-row qkv used to lose a row silently (95 gave a 31-row to_v)."""
    width = 8
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.randn(3 * width, width),
               "single_blocks.0.linear1.weight": torch.randn(7 * width, width)}, str(tmp_path / "flux.safetensors"))
    for rows in (3 * width + 1, 3 * width - 1):
        save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, width),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(rows, 2)},
                  str(tmp_path / "lora.safetensors"))
        out = tmp_path / "out.safetensors"
        for args in (["merge", tmp_path / "flux.safetensors", tmp_path / "lora.safetensors", "-o", out],
                     ["convert", tmp_path / "lora.safetensors", "--to", "diffusers", "--base",
                      tmp_path / "flux.safetensors", "-o", out]):
            assert_refused(run_cli(*args), out, f"{rows} output rows", f"take {3 * width}")


def test_the_same_module_under_two_dialects_is_refused_not_applied_twice(run_cli, tmp_path):
    width = 8
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.randn(3 * width, width),
               "single_blocks.0.linear1.weight": torch.randn(7 * width, width)}, str(tmp_path / "flux.safetensors"))
    down, up = torch.randn(2, width), torch.randn(3 * width, 2)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lycoris_double_blocks_0_img_attn_qkv.lora_down.weight": down.clone(),
               "lycoris_double_blocks_0_img_attn_qkv.lora_up.weight": up.clone()}, str(tmp_path / "twice.safetensors"))
    out = tmp_path / "out.safetensors"
    for args in (["merge", tmp_path / "flux.safetensors", tmp_path / "twice.safetensors", "-o", out],
                 ["resize", tmp_path / "twice.safetensors", "--base", tmp_path / "flux.safetensors", "--rank", "1",
                  "-o", tmp_path / "r"]):
        assert_refused(run_cli(*args), out, "lora_unet_double_blocks_0_img_attn_qkv", "lycoris_double_blocks_0")


def test_nan_factors_are_refused_by_every_command_that_writes(run_cli, tmp_path):
    """Only merge has an override (--allow-nonfinite); nothing else writes a NaN."""
    adapter = kohya_file(tmp_path / "nan.safetensors", **{"lora_up.weight": torch.full((8, 2), math.nan)})
    good = kohya_file(tmp_path / "good.safetensors")
    out = tmp_path / "out"
    for args in (["resize", adapter, "--rank", "1", "-o", out],
                 ["combine", adapter, good, "--method", "svd", "--rank", "2", "-o", out],
                 ["convert", adapter, "--to", "kohya", "-o", out.with_suffix(".safetensors")]):
        line = assert_refused(run_cli(*args), out, "NaN/Inf", f"{NAME}.lora_B")
        assert "--allow-nonfinite" not in line
