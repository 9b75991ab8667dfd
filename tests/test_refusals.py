"""Every bad input: one `Error:` line, exit 2, no traceback, nothing written, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from helpers import LLAMA_LINEARS, assert_refused, make_adapter, tiny_gpt2, tiny_llama
from loratool import merge
from loratool.checkpoint.output import TEMP_MARK
from loratool.errors import LoratoolError


def digest(path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("refusal") / "base"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("refusal") / "adapter"
    make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, init_lora_weights=False), path)
    return path


def copy_adapter(adapter, tmp_path, edit_config=None, edit_tensors=None):
    path = tmp_path / "edited"
    shutil.copytree(adapter, path)
    if edit_config:
        config = json.loads((path / "adapter_config.json").read_text())
        edit_config(config)
        (path / "adapter_config.json").write_text(json.dumps(config))
    if edit_tensors:
        from safetensors.torch import load_file

        tensors = load_file(path / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


def test_unknown_modules_are_listed(run_cli, tmp_path, base):
    gpt2_adapter = tmp_path / "gpt2_lora"
    make_adapter(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False), gpt2_adapter)
    before = digest(base)
    result = run_cli("merge", base, gpt2_adapter, "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "does not have", "transformer.h.0.attn.c_attn")
    assert digest(base) == before


def test_shape_clash(run_cli, tmp_path, base):
    wide = tmp_path / "wide"
    make_adapter(tiny_llama(hidden_size=48, num_attention_heads=4), LoraConfig(r=2, target_modules=["q_proj"],
                                                                            init_lora_weights=False), wide)
    result = run_cli("merge", base, wide, "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "does not fit", "q_proj", "[32, 32]")


def test_nonfinite_adapter(run_cli, tmp_path, base, adapter):
    def poison(tensors):
        key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
        tensors[key][0, 0] = float("nan")

    bad = copy_adapter(adapter, tmp_path, edit_tensors=poison)
    result = run_cli("merge", base, bad, "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "NaN/Inf", "q_proj.lora_B", "--allow-nonfinite")
    assert run_cli("merge", base, bad, "-o", tmp_path / "out", "--allow-nonfinite").code == 0
    result = run_cli("inspect", bad, "--check")
    assert result.code == 2 and "NaN/Inf in 1 tensor" in result.stdout


def test_overflowing_result_is_refused(run_cli, tmp_path, base, adapter):
    def huge(tensors):
        key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
        tensors[key].fill_(1e6)

    big = copy_adapter(adapter, tmp_path, edit_tensors=huge)
    result = run_cli("merge", base, big, "-o", tmp_path / "out", "--dtype", "float16")
    assert_refused(result, tmp_path / "out", "q_proj.weight", "NaN/Inf", "float16")


def test_lm_head_on_tied_base(run_cli, tmp_path):
    tied_base = tmp_path / "tied"
    tiny_llama(tie_word_embeddings=True).save_pretrained(tied_base)
    head = tmp_path / "head"
    make_adapter(tiny_llama(tie_word_embeddings=True),
                 LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False), head)
    result = run_cli("merge", tied_base, head, "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "lm_head", "tie")


def test_existing_output_needs_force(run_cli, tmp_path, base, adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("merge", base, adapter, "-o", out)
    assert result.code == 2 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("merge", base, adapter, "-o", out, "--force").code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


@pytest.mark.parametrize("where", ["base", "inside_base", "adapter", "parent_of_base"])
def test_output_that_is_or_holds_an_input(run_cli, tmp_path, base, adapter, where):
    work = tmp_path / "work"
    shutil.copytree(base, work / "base")
    targets = {"base": work / "base", "inside_base": work / "base" / "merged", "adapter": adapter,
               "parent_of_base": work}
    before = digest(work / "base")
    result = run_cli("merge", work / "base", adapter, "-o", targets[where], "--force")
    assert_refused(result, None, "input")
    assert digest(work / "base") == before


class Hostile:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_never_runs(run_cli, tmp_path, adapter):
    marker = tmp_path / "pwned"
    Hostile.marker = marker
    folder = tmp_path / "pickled"
    folder.mkdir()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Hostile()}, f)
    result = run_cli("merge", folder, adapter, "-o", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "pickle", "--allow-pickle")
    result = run_cli("merge", folder, adapter, "-o", tmp_path / "out", "--allow-pickle")
    assert_refused(result, tmp_path / "out", "weights_only")
    result = run_cli("inspect", folder / "pytorch_model.bin", "--allow-pickle")
    assert result.code == 2 and "weights_only" in result.stderr
    assert not marker.exists()


def test_pickle_disguised_as_safetensors(run_cli, tmp_path):
    fake = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, fake)
    assert_refused(run_cli("inspect", fake), None, "pickle")


def test_safe_pickle_loads_with_opt_in(run_cli, tmp_path, base, adapter):
    from helpers import load_folder

    folder = tmp_path / "bin_base"
    folder.mkdir()
    torch.save(load_folder(base), folder / "pytorch_model.bin")
    shutil.copy(base / "config.json", folder / "config.json")
    result = run_cli("merge", folder, adapter, "-o", tmp_path / "out", "--allow-pickle")
    assert result.code == 0, result
    assert (tmp_path / "out" / "model.safetensors").exists()


def _header(entries: dict, data: bytes = b"", raw: bytes | None = None) -> bytes:
    encoded = raw if raw is not None else json.dumps(entries).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@pytest.mark.parametrize("name,blob,needle", [
    ("empty", b"", "too short"),
    ("huge_header_len", struct.pack("<Q", 2**40) + b"{}", "header length"),
    ("not_json", _header({}, raw=b"{not json"), "not valid JSON"),
    ("not_object", _header({}, raw=b"[1, 2]"), "not a JSON object"),
    ("bad_dtype", _header({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype"),
    ("bytes_mismatch", _header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "span 4"),
    ("past_end", _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated"),
    ("overlap", _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    ("negative_shape", _header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    ("reversed", _header({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8), "order"),
])
def test_malformed_safetensors(run_cli, tmp_path, adapter, name, blob, needle):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    assert_refused(run_cli("inspect", path), None, needle)
    assert_refused(run_cli("merge", path, adapter, "-o", tmp_path / "out.safetensors"), tmp_path / "out.safetensors")


def test_truncated_real_checkpoint(run_cli, tmp_path, base, adapter):
    data = (base / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    assert_refused(run_cli("merge", cut, adapter, "-o", tmp_path / "o.safetensors"), tmp_path / "o.safetensors",
                   "truncated")


def test_base_changing_init_is_refused(run_cli, tmp_path, base, adapter):
    pissa = copy_adapter(adapter, tmp_path, edit_config=lambda c: c.update(init_lora_weights="pissa_niter_4"))
    assert_refused(run_cli("merge", base, pissa, "-o", tmp_path / "out"), tmp_path / "out", "PiSSA", "base")
    assert_refused(run_cli("inspect", pissa), None, "PiSSA")


def test_rank_disagreeing_with_config(run_cli, tmp_path, base, adapter):
    wrong = copy_adapter(adapter, tmp_path, edit_config=lambda c: c.update(r=8))
    assert_refused(run_cli("merge", base, wrong, "-o", tmp_path / "out"), tmp_path / "out", "rank 4", "r=8")


def test_dora_cannot_be_unmerged(run_cli, tmp_path, base):
    dora = tmp_path / "dora"
    make_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), dora)
    assert_refused(run_cli("merge", base, dora, "-o", tmp_path / "out", "--weights", "-1"), tmp_path / "out", "DoRA")


@pytest.mark.parametrize("args,needle", [
    (["--weights", "1,2"], "2 values for 1 adapter"),
    (["--weights", "one"], "comma-separated"),
    (["--max-shard-size", "lots"], "size"),
])
def test_bad_options(run_cli, tmp_path, base, adapter, args, needle):
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", *args)
    assert result.code == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_several_named_adapters_must_be_chosen(run_cli, tmp_path, base, adapter):
    both = tmp_path / "both"
    shutil.copytree(adapter, both / "first")
    shutil.copytree(adapter, both / "second")
    assert_refused(run_cli("merge", base, both, "-o", tmp_path / "out"), tmp_path / "out", "first", "second")
    assert run_cli("merge", base, both / "second", "-o", tmp_path / "out").code == 0


def test_debug_shows_traceback(run_cli, tmp_path, base):
    result = run_cli("--debug", "merge", base, tmp_path / "missing", "-o", tmp_path / "out")
    assert result.code == 2 and "Traceback" in result.stderr


def test_interrupt_leaves_nothing(tmp_path, base, adapter):
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(base, [adapter], tmp_path / "out", progress=interrupt)
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []


def test_api_errors_are_typed(tmp_path, base):
    with pytest.raises(LoratoolError):
        merge(base, [tmp_path / "nope"], tmp_path / "out")
