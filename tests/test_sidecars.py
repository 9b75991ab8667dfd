"""Issue 19, items 3 and 5: every JSON sidecar (`model_index.json`, `config.json`, `adapter_config.json`,
diffusers metadata JSON, the patterns in them) and a GGUF adapter's alpha are checked for type and range
where they are read. Each bad one is one `Error:` line naming the file and the key, exit 2, nothing
written; absurd layer and head counts are refused before anything is sized by them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import FIXTURES, assert_refused

BASE = FIXTURES / "tiny-llama"
ADAPTER = FIXTURES / "lora-llama"


def edited_json(source: Path, folder: Path, name: str, text: str) -> Path:
    """A copy of `source` (a folder) in `folder` with its file `name` replaced by `text`."""
    shutil.copytree(source, folder)
    (folder / name).write_text(text)
    return folder


def edited_config(source: Path, folder: Path, name: str, **changes) -> Path:
    config = json.loads((source / name).read_text())
    config.update(changes)
    return edited_json(source, folder, name, json.dumps(config))


# -- model_index.json ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,needle", [
    ('["unet", "text_encoder"]', "expected a JSON object, found a list"),
    ('{"_class_name": ["StableDiffusionPipeline"]}', "_class_name must be a string"),
    ('{"_class_name": "StableDiffusionPipeline", "unet": Infinity}', "'unet' is Infinity"),
    ('{"unet": ["diffusers", "UNet2DConditionModel"], "unet": null}', "'unet' appears twice"),
    ('{"_class_name": ' * 100 + "1" + "}" * 100, "nested more than 64 levels"),
])
def test_model_index(run_cli, tmp_path, text, needle):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(text)
    assert_refused(run_cli("inspect", pipeline), None, "model_index.json", needle)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", pipeline, ADAPTER, "-o", out), out, "model_index.json", needle)


# -- config.json -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,needle", [
    ("[1, 2]", "expected a JSON object, found a list"),
    ('{"model_type": "llama", "rope_theta": NaN}', "'rope_theta' is NaN"),
    ('{"model_type": "llama", "model_type": "gpt2"}', "'model_type' appears twice"),
    ('{"model_type": ["llama"]}', "model_type must be a string"),
    ('{"architectures": "LlamaForCausalLM"}', "architectures must be a list of strings"),
    ('{"num_attention_heads": 0}', "num_attention_heads must be"),
    ('{"num_hidden_layers": 1000000}', "num_hidden_layers must be a whole number from 1 to 1,024"),
    ('{"tie_word_embeddings": "yes"}', "tie_word_embeddings must be true or false"),
])
def test_model_config(run_cli, tmp_path, text, needle):
    base = edited_json(BASE, tmp_path / "base", "config.json", text)
    assert_refused(run_cli("inspect", base), None, "config.json", needle)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", base, ADAPTER, "-o", out), out, "config.json", needle)


@pytest.mark.parametrize("changes,needle", [
    ({"num_hidden_layers": 1_000_000}, "num_hidden_layers must be a whole number from 1 to 1,024, got 1000000"),
    ({"num_hidden_layers": 1e6}, "num_hidden_layers must be a whole number"),
    ({"num_attention_heads": 0}, "num_attention_heads must be"),
    ({"num_key_value_heads": -2}, "num_key_value_heads must be a whole number from 1"),
    ({"num_attention_heads": "32"}, "num_attention_heads must be"),
])
def test_gguf_base_config_is_checked_before_anything_is_sized(run_cli, tmp_path, changes, needle):
    """1e6 layers once took 68 s and then a MemoryError building llama.cpp's name map."""
    pytest.importorskip("gguf")
    base = edited_config(BASE, tmp_path / "base", "config.json", **changes)
    out = tmp_path / "adapter.gguf"
    started = time.perf_counter()
    result = run_cli("convert", ADAPTER, "--to", "gguf", "--base", base, "-o", out)
    assert_refused(result, out, "config.json", needle)
    assert time.perf_counter() - started < 5


# -- adapter_config.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,needle", [
    ({"lora_alpha": "16"}, "lora_alpha must be a positive number, got '16'"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
    ({"lora_alpha": True}, "lora_alpha must be a positive number"),
    ({"r": 8.5}, "r must be a whole number"),
    ({"r": 0}, "r must be a whole number from 1"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj'] must be a positive number, got 'x'"),
    ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern['q_proj'] must be a positive number, got -1"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj'] must be a whole number from 1"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern key '(' is not a valid regular expression (missing ), unterminated "
                                 "subpattern at position 0)"),
    ({"alpha_pattern": {"v_proj[": 4}}, "alpha_pattern key 'v_proj[' is not a valid regular expression"),
    ({"alpha_pattern": {"(?i)v_proj": 4}}, "alpha_pattern key '(?i)v_proj' is not a valid regular expression"),
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
])
def test_adapter_config_values(run_cli, tmp_path, changes, needle):
    adapter = edited_config(ADAPTER, tmp_path / "adapter", "adapter_config.json", **changes)
    assert_refused(run_cli("inspect", adapter), None, "adapter_config.json", needle)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", BASE, adapter, "-o", out), out, "adapter_config.json", needle)


@pytest.mark.parametrize("value,shown", [("NaN", "NaN"), ("Infinity", "Infinity"), ("-1e400", "-1e400")])
def test_adapter_config_nonfinite_alpha(run_cli, tmp_path, value, shown):
    text = (ADAPTER / "adapter_config.json").read_text().replace('"lora_alpha": 16', f'"lora_alpha": {value}')
    adapter = edited_json(ADAPTER, tmp_path / "adapter", "adapter_config.json", text)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", BASE, adapter, "-o", out), out, "adapter_config.json", "'lora_alpha'", shown)
    out = tmp_path / "kohya.safetensors"
    assert_refused(run_cli("convert", adapter, "--to", "kohya", "-o", out), out, "adapter_config.json", shown)


@pytest.mark.parametrize("text,needle", [
    ("{", "not valid JSON"),
    ('["r", 8]', "expected a JSON object, found a list"),
    ('{"r": 8, "lora_alpha": 16, "r": 4}', "'r' appears twice"),
    ('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 64 levels"),
    ('{"peft_type": "LOHA", "x": ' + "{" * 100_000, "nested more than 64 levels"),
])
def test_adapter_config_text(run_cli, tmp_path, text, needle):
    adapter = edited_json(ADAPTER, tmp_path / "adapter", "adapter_config.json", text)
    assert_refused(run_cli("inspect", adapter), None, "adapter_config.json", needle)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", BASE, adapter, "-o", out), out, "adapter_config.json", needle)


@pytest.mark.parametrize("text,needle", [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object, found a list"),
    ('{"r": 4, "r": 8}', "'r' appears twice"),
    ('{"lora_alpha": NaN}', "'lora_alpha' is NaN"),
    ('{"alpha_pattern": {"(": 2}}', "key '(' is not"),
])
def test_broken_adapter_config_beside_a_checkpoint_given_to_extract(run_cli, tmp_path, text, needle):
    folder = tmp_path / "trained"
    folder.mkdir()
    prefix = "base_model.model.proj"
    save_file({f"{prefix}.base_layer.weight": torch.randn(6, 4), f"{prefix}.lora_A.default.weight": torch.randn(2, 4),
               f"{prefix}.lora_B.default.weight": torch.randn(6, 2)}, str(folder / "model.safetensors"))
    (folder / "adapter_config.json").write_text(text)
    out = tmp_path / "adapter"
    assert_refused(run_cli("extract", folder / "model.safetensors", "-o", out), out, "adapter_config.json", needle)


def test_peft_loha_config_pattern(run_cli, tmp_path):
    folder = tmp_path / "loha"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 2,
                                                            "rank_pattern": {"fc(": 1}}))
    save_file({"base_model.model.fc.hada_w1_a": torch.randn(4, 2)}, str(folder / "adapter_model.safetensors"))
    assert_refused(run_cli("inspect", folder), None, "adapter_config.json", "key 'fc(' is not")


# -- diffusers metadata ----------------------------------------------------------------------------------


def diffusers_lora(path: Path, metadata_json: str) -> Path:
    save_file({"unet.mid.proj.lora_A.weight": torch.randn(2, 4), "unet.mid.proj.lora_B.weight": torch.randn(4, 2)},
              str(path), metadata={"format": "pt", "lora_adapter_metadata": metadata_json})
    return path


@pytest.mark.parametrize("text,needle", [
    ('[{"unet.r": 2}]', "expected a JSON object, found a list"),
    ('{"unet.r": 2, "unet.lora_alpha": NaN}', "'unet.lora_alpha' is NaN"),
    ('{"unet.r": 2, "unet.lora_alpha": "4"}', "unet.lora_alpha must be a positive number"),
    ('{"unet.r": 2, "unet.alpha_pattern": {"(": 1}}', "unet.alpha_pattern key '(' is not a valid regular"),
    ('{"unet.r": 2, "unet.r": 3}', "'unet.r' appears twice"),
    ('{"unet.use_rslora": 1}', "unet.use_rslora must be true or false"),
])
def test_diffusers_metadata(run_cli, tmp_path, text, needle):
    lora = diffusers_lora(tmp_path / "lora.safetensors", text)
    needles = ("lora.safetensors", "lora_adapter_metadata", needle)
    assert_refused(run_cli("inspect", lora), None, *needles)
    out = tmp_path / "out"
    assert_refused(run_cli("convert", lora, "--to", "peft", "-o", out), out, *needles)


# -- kohya / bare PEFT metadata --------------------------------------------------------------------------


def test_bare_peft_metadata_alpha_must_be_finite(run_cli, tmp_path):
    source = ADAPTER / "adapter_model.safetensors"
    from safetensors.torch import load_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(source)), str(bare), metadata={"lora_alpha": "inf"})
    out = tmp_path / "out"
    assert_refused(run_cli("merge", BASE, bare, "-o", out), out, "bare.safetensors", "'lora_alpha'", "--alpha")
    assert run_cli("merge", BASE, bare, "-o", out, "--alpha", "16").code == 0


# -- GGUF adapters ---------------------------------------------------------------------------------------


def gguf_adapter(path: Path, alpha) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if isinstance(alpha, str):
        writer.add_string(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    elif isinstance(alpha, list):
        writer.add_array(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    else:
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((8, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alpha,shown", [("sixteen", "'sixteen'"), ("16", "'16'"), (float("nan"), "nan"),
                                         (float("inf"), "inf"), (-4.0, "-4.0"), ([16, 16], "[2 ×")])
def test_gguf_adapter_alpha(run_cli, tmp_path, alpha, shown):
    path = gguf_adapter(tmp_path / "lora.gguf", alpha)
    for args in ((), ("--json",), ("--check",)):
        assert_refused(run_cli("inspect", path, *args), None, "lora.gguf", "adapter.lora.alpha", shown)


def test_gguf_adapter_with_a_number_alpha_still_reads(run_cli, tmp_path):
    path = gguf_adapter(tmp_path / "lora.gguf", 16.0)
    result = run_cli("inspect", path, "--json")
    assert result.code == 0, result
    assert json.loads(result.stdout)["lora_alpha"] == 16.0


def test_export_onnx_reads_config_json_through_the_same_checks(tmp_path):
    from loratool.errors import UsageError
    from loratool.export.graph import model_config

    for text in ("[1, 2]", '{"model_type": "llama", "num_hidden_layers": 1e9}', "{" * 200):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(UsageError, match="config.json"):
            model_config(tmp_path)
