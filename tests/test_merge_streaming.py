"""Merge streams plain LoRA targets in row chunks through a fixed buffer pool, so its memory does not
grow with the tensor size. Shrinking the chunk to a row or two must not change the result beyond the
last-place rounding that BLAS kernels of other shapes may give, and no changed tensor is read whole."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from helpers import LLAMA_LINEARS, make_adapter, peft_merged_state, tiny_gpt2, tiny_llama

def _merge_module():
    import loratool.api.merge

    return loratool.api.merge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    cases = {}
    llama = root / "llama"
    tiny_llama().save_pretrained(llama, max_shard_size="150KB")
    make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=[*LLAMA_LINEARS, "embed_tokens"],
                                          init_lora_weights=False), root / "llama_lora")
    cases["llama+embedding"] = (llama, root / "llama_lora", tiny_llama)
    gpt2 = root / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    make_adapter(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "c_fc", "wte"], init_lora_weights=False,
                                         fan_in_fan_out=True), root / "gpt2_lora")
    cases["gpt2 Conv1D"] = (gpt2, root / "gpt2_lora", tiny_gpt2)
    return cases


def folder_tensors(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_to_rounding(ours: dict, reference: dict) -> None:
    """Equal up to the float32 summation order inside BLAS (a chunk of other height may take another
    kernel), then rounded once: at most one unit in the last place of the output dtype."""
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        expected = reference[name]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        if torch.equal(tensor, expected):
            continue
        scale = torch.finfo(tensor.dtype).eps * expected.double().abs().max()
        worst = (tensor.double() - expected.double()).abs().max()
        assert worst <= 4 * scale, (name, worst.item(), scale.item())


@pytest.mark.parametrize("case", ["llama+embedding", "gpt2 Conv1D"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_tiny_chunks_give_the_same_bytes(run_cli, tmp_path, monkeypatch, models, case, dtype):
    base, adapter, _ = models[case]
    assert run_cli("merge", base, adapter, "--dtype", dtype, "-o", tmp_path / "whole").code == 0
    module = _merge_module()
    from loratool.checkpoint.reader import Checkpoint

    reads = {"rows": 0, "whole": []}
    real_rows, real_read = Checkpoint.read_rows, Checkpoint.read

    def read_rows(self, name, start, stop, buffer=None):
        assert (stop - start) * self.row_bytes(name) <= max(64, self.row_bytes(name))
        reads["rows"] += 1
        return real_rows(self, name, start, stop, buffer)

    def read(self, name):
        if self.path.resolve() == base.resolve():  # the adapter's own tensors are read whole, as always
            reads["whole"].append(name)
        return real_read(self, name)

    monkeypatch.setattr(module, "CHUNK_BYTES", 64)  # a row or two per chunk
    monkeypatch.setattr(Checkpoint, "read_rows", read_rows)
    monkeypatch.setattr(Checkpoint, "read", read)
    assert run_cli("merge", base, adapter, "--dtype", dtype, "-o", tmp_path / "chunked").code == 0
    assert_same_to_rounding(folder_tensors(tmp_path / "chunked"), folder_tensors(tmp_path / "whole"))
    assert reads["rows"] > 50 and reads["whole"] == []  # no tensor of the base was read whole


def test_chunked_merge_matches_peft(run_cli, tmp_path, monkeypatch, models):
    base, adapter, build = models["gpt2 Conv1D"]
    monkeypatch.setattr(_merge_module(), "CHUNK_BYTES", 256)
    assert run_cli("merge", base, adapter, "-o", tmp_path / "out").code == 0
    ours = load_file(tmp_path / "out" / "model.safetensors")
    oracle = peft_merged_state(build(), [adapter])
    worst = max((ours[k].double() - oracle[k].double()).abs().max().item() for k in ours if k in oracle)
    assert worst < 1e-5


def test_merge_restores_torch_threads(tmp_path, models):
    from loratool import merge

    base, adapter, _ = models["llama+embedding"]
    before = torch.get_num_threads()
    merge(base, [adapter], tmp_path / "out")
    assert torch.get_num_threads() == before
