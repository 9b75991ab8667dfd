"""`export-onnx` and `bench-onnx` against PEFT's merged models, run through onnxruntime.

Exports take seconds each, so every graph is built once per session by a fixture and shared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from peft import LoraConfig, PeftModel

from helpers import LLAMA_LINEARS, make_adapter, ok, tiny_gpt2, tiny_llama, tiny_qwen2
from loratool.export.runtime import greedy_generate, run_options_with

CASES = {
    "llama": (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, init_lora_weights=False)),
    "qwen2": (tiny_qwen2, LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False)),
    "gpt2": (tiny_gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                   init_lora_weights=False)),
}
SHAPES = ((1, 6), (2, 13))


@pytest.fixture(scope="session")
def onnx_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def _case(root: Path, arch: str):
    build, config = CASES[arch]
    base, adapter = root / f"{arch}_base", root / f"{arch}_lora"
    if not base.exists():
        build().save_pretrained(base)
        make_adapter(build(), config, adapter, seed=4)
    return base, adapter


def _export(run_cli, root: Path, name: str, *args) -> Path:
    out = root / name
    if not (out / "model.onnx").exists():
        ok(run_cli("export-onnx", *args, "-o", out))
    return out


def peft_merged(arch: str, base: Path, adapter: Path):
    model_class = type(CASES[arch][0]())
    return PeftModel.from_pretrained(model_class.from_pretrained(base), str(adapter)).merge_and_unload().eval()


def ort_logits(folder: Path, ids: torch.Tensor, run_options=None) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, dtype=np.int64)}
    return session.run(["logits"], feeds, run_options=run_options)[0]


def torch_logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


@pytest.mark.parametrize("arch", list(CASES))
def test_merged_export_matches_peft_merge(run_cli, onnx_root, arch):
    base, adapter = _case(onnx_root, arch)
    out = _export(run_cli, onnx_root, f"{arch}_merged", base, "--adapter", adapter)
    facts = json.loads((out / "loratool_export.json").read_text())
    assert facts["inputs"][:2] == ["input_ids", "attention_mask"] and max(facts["validation_max_abs_diff"]) < 1e-4
    assert isinstance(facts["opset"], int) and facts["adapters"] == [str(adapter)]
    assert (out / "config.json").is_file() and (out / "model.onnx.data").is_file()
    model = peft_merged(arch, base, adapter)
    vocab = model.config.vocab_size
    for seed, shape in enumerate(SHAPES):
        ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
        expected = torch_logits(model, ids)
        assert np.abs(ort_logits(out, ids) - expected).max() < 1e-4
    # the adapter really changes the logits, so the comparison above can fail
    base_model = type(model).from_pretrained(base).eval()
    assert np.abs(torch_logits(base_model, ids) - expected).max() > 1e-3


def test_export_with_adapter_equals_export_of_premerged_checkpoint(run_cli, onnx_root):
    base, adapter = _case(onnx_root, "llama")
    with_adapter = _export(run_cli, onnx_root, "llama_merged", base, "--adapter", adapter)
    premerged = onnx_root / "llama_premerged_ckpt"
    if not premerged.exists():
        ok(run_cli("merge", base, adapter, "-o", premerged))
    from_checkpoint = _export(run_cli, onnx_root, "llama_premerged", premerged)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    assert np.array_equal(ort_logits(with_adapter, ids), ort_logits(from_checkpoint, ids))


def test_with_past_greedy_generation_equals_transformers(run_cli, onnx_root):
    base, adapter = _case(onnx_root, "llama")
    out = _export(run_cli, onnx_root, "llama_past", base, "--adapter", adapter, "--with-past")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert any(i.name.startswith("past_key_values.") for i in session.get_inputs())
    model = peft_merged("llama", base, adapter)
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    ours = greedy_generate(session, model.config, prompt.numpy(), 20)
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert ours.shape == (1, 26) and np.array_equal(ours, theirs.numpy())


def test_adapter_inputs_serve_two_adapters_and_none_from_one_session(run_cli, onnx_root):
    base, first = _case(onnx_root, "llama")
    second = onnx_root / "llama_lora_qv"
    if not second.exists():
        make_adapter(tiny_llama(), LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False), second, seed=8)
    out = _export(run_cli, onnx_root, "llama_multi", base, "--adapter", first, "--adapter", second, "--adapter-inputs")
    files = json.loads((out / "loratool_export.json").read_text())["adapter_files"]
    assert len(files) == 2
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, dtype=np.int64)}
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(first), adapter_name="first")
    peft_model.load_adapter(str(second), adapter_name="second")
    results = {}
    for label, adapter_file in (("first", files[0]), ("second", files[1]), ("first again", files[0]), ("none", None)):
        options, loaded = run_options_with(out / adapter_file if adapter_file else None)
        results[label] = session.run(["logits"], feeds, run_options=options)[0]
        del loaded
    for label in ("first", "second"):
        peft_model.set_adapter(label)
        assert np.abs(results[label] - torch_logits(peft_model, ids)).max() < 1e-4, label
    with peft_model.disable_adapter():
        assert np.abs(results["none"] - torch_logits(peft_model, ids)).max() < 1e-4
    assert np.array_equal(results["first"], results["first again"])
    assert np.abs(results["first"] - results["second"]).max() > 1e-3


def test_validation_failure_writes_nothing(run_cli, onnx_root, tmp_path):
    base, adapter = _case(onnx_root, "llama")
    result = run_cli("export-onnx", base, "--adapter", adapter, "--atol", "1e-12", "-o", tmp_path / "out")
    assert result.code == 2 and "above --atol" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_unsupported_and_incomplete_models(run_cli, onnx_root, tmp_path):
    base, _ = _case(onnx_root, "llama")
    bert = tmp_path / "bert"
    shutil.copytree(base, bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = run_cli("export-onnx", bert, "-o", tmp_path / "out")
    assert result.code == 2 and "'bert' is not supported" in result.stderr and "llama, mistral, qwen2, gpt2" in result.stderr
    (bert / "config.json").unlink()
    result = run_cli("export-onnx", bert, "-o", tmp_path / "out")
    assert result.code == 2 and "no config.json" in result.stderr
    both = run_cli("export-onnx", base, "--with-past", "--adapter-inputs", "--adapter", base, "-o", tmp_path / "out")
    assert both.code == 2 and "cannot be combined" in both.stderr
    assert not (tmp_path / "out").exists()


def test_bench_onnx_reports_all_variants(run_cli, onnx_root):
    base, adapter = _case(onnx_root, "llama")
    merged = _export(run_cli, onnx_root, "llama_merged", base, "--adapter", adapter)
    work = onnx_root / "bench"
    if not work.exists():  # reuse the merged graph; bench exports the base and unmerged graphs itself
        work.mkdir()
        shutil.copytree(merged, work / "merged")
    result = ok(run_cli("bench-onnx", base, "--adapter", adapter, "--seq", "8", "--repeats", "3", "--provider", "cpu",
                        "--work", work, "--json"))
    report = json.loads(result.stdout)
    assert set(report["median_ms"]) == {"onnx base", "onnx merged", "onnx unmerged LoRA", "torch eager merged"}
    assert all(v > 0 for v in report["median_ms"].values())
    assert report["ratios"]["merged/base"] == pytest.approx(report["median_ms"]["onnx merged"] /
                                                            report["median_ms"]["onnx base"], rel=1e-2)
