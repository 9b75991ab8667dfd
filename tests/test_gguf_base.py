"""GGUF model files as merge bases (`checkpoint/gguf_base.py`, `quant/gguf_codec.py`, `api/merge_gguf.py`).

The fixtures are fixtures/tiny-llama converted by llama.cpp's own `convert_hf_to_gguf.py`
(scripts/make_gguf_base_fixture.py) to F16 and Q8_0. The oracles are the `gguf` package (`GGUFReader`,
`quants.dequantize`/`quantize`), llama.cpp's row permutation written out here, PEFT's merge and float64
sums. Files holding K-quants, which the package cannot quantize, are written with `GGUFWriter` from
random blocks: any bytes with finite half-float scales are a valid K-quant block, and the package's
`dequantize` says what they hold.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

from helpers import assert_refused, ok

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
HF = FIXTURES / "tiny-llama"
F16, Q8 = FIXTURES / "gguf-base" / "tiny-llama-f16.gguf", FIXTURES / "gguf-base" / "tiny-llama-q8_0.gguf"
HEADS, KV_HEADS = 4, 2


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), HF rows -> GGUF rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_of(name: str) -> int | None:
    return HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else None


def raw_tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def deq(t) -> torch.Tensor:
    """A GGUFReader tensor dequantized by the package, torch order, stored row order."""
    return torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32))


def rtn(values: torch.Tensor, kind) -> torch.Tensor:
    """Round to nearest in `kind`: the package's quantize, then dequantize."""
    return torch.from_numpy(dequantize(quantize(values.numpy().astype(np.float32), kind), kind).astype(np.float32))


def gguf_name_of(checkpoint, name: str) -> str:
    return checkpoint.places[name].stored_name


@pytest.fixture(scope="module")
def hf() -> dict[str, torch.Tensor]:
    return load_file(HF / "model.safetensors")


# --- reading --------------------------------------------------------------------------------------


def test_f16_file_reads_as_the_hf_model(hf):
    from loratool.checkpoint import open_checkpoint

    with open_checkpoint(F16) as checkpoint:
        assert set(checkpoint.tensors) == set(hf)
        for name, weight in hf.items():
            assert checkpoint[name].shape == tuple(weight.shape)
            assert torch.equal(checkpoint.read(name), weight.half().float() if weight.dim() == 2 else weight), name
        assert checkpoint["model.layers.0.self_attn.q_proj.weight"].encoding.describe() == "F16"


def test_q8_0_file_is_the_hf_model_rounded_once(hf):
    """Every Q8_0 tensor is exactly the package's Q8_0 of the HF weight in llama.cpp's row order: the
    reader's names, unpermuting and dequantizing are all right."""
    from loratool.checkpoint import open_checkpoint

    raw = raw_tensors(Q8)
    with open_checkpoint(Q8) as checkpoint:
        for name, weight in hf.items():
            tensor = raw[gguf_name_of(checkpoint, name)]
            if tensor.tensor_type == Q.F32:
                assert torch.equal(checkpoint.read(name), weight)
                continue
            heads = heads_of(name)
            stored = permute(weight, heads) if heads else weight
            assert np.array_equal(tensor.data, quantize(stored.numpy(), Q.Q8_0)), name
            expected = rtn(stored, Q.Q8_0)
            assert torch.equal(checkpoint.read(name), unpermute(expected, heads) if heads else expected), name


def test_q_and_k_rows_really_are_permuted_in_the_file(hf):
    """Reading the file's q/k as stored would be wrong, so the unpermute is not a no-op."""
    raw = raw_tensors(F16)
    for layer in range(2):
        q = deq(raw[f"blk.{layer}.attn_q.weight"])
        k = deq(raw[f"blk.{layer}.attn_k.weight"])
        assert not torch.equal(q, hf[f"model.layers.{layer}.self_attn.q_proj.weight"].half().float())
        assert torch.equal(unpermute(q, HEADS), hf[f"model.layers.{layer}.self_attn.q_proj.weight"].half().float())
        assert torch.equal(unpermute(k, KV_HEADS), hf[f"model.layers.{layer}.self_attn.k_proj.weight"].half().float())


def test_config_and_layout_come_from_the_metadata():
    from loratool.layouts import open_base

    hf_config = __import__("json").loads((HF / "config.json").read_text())
    layout, checkpoints = open_base(Q8)
    try:
        config = checkpoints[None].config()
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "tie_word_embeddings", "model_type", "architectures"):
            assert config[key] == hf_config[key], key
        assert layout.family == "LlamaForCausalLM"
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()


# --- a file of mixed K-quants, written here --------------------------------------------------------

#: Byte offsets of the half-float scales in one block (ggml-common.h), the only bytes that must be finite.
_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def kquant_bytes(rows: int, cols: int, kind, seed: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in _SCALES[kind]:
        data[..., offset:offset + 2] = rng.uniform(0.001, 0.01, size=(rows, cols // block, 1)).astype(np.float16).view(
            np.uint8)
    return data.reshape(rows, -1)


def write_mixed(path: Path, arch: str | None = "flux", extra_keys=None, extra_tensors=(), alignment=None
                ) -> dict[str, tuple]:
    """A file of Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, F16 and F32 tensors; returns name -> (type, torch-order shape).
    `arch` None: no general.architecture, as some stable-diffusion.cpp files."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch or "")
    if arch is None:
        writer.kv_data[0].pop("general.architecture", None)  # an empty name is not written anyway
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_name("mixed")
    for key, value in (extra_keys or {}).items():
        writer.add_array(key, value) if isinstance(value, list) else writer.add_uint32(key, value)
    made = {}
    for i, kind in enumerate((Q.Q4_K, Q.Q5_K, Q.Q6_K)):
        name = f"double_blocks.{i}.img_mlp.0.weight"
        writer.add_tensor(name, kquant_bytes(8, 512, kind, i), raw_dtype=kind)
        made[name] = (kind.name, (8, 512))
    values = rng.standard_normal((16, 64)).astype(np.float32)
    for name, kind in (("img_in.weight", Q.Q8_0), ("txt_in.weight", Q.Q4_0)):
        writer.add_tensor(name, quantize(values, kind), raw_dtype=kind)
        made[name] = (kind.name, (16, 64))
    writer.add_tensor("time_in.in_layer.weight", values.astype(np.float16))
    made["time_in.in_layer.weight"] = ("F16", (16, 64))
    writer.add_tensor("final_layer.linear.bias", values[0])
    made["final_layer.linear.bias"] = ("F32", (64,))
    for name, data, kind in extra_tensors:
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return made


def test_a_mixed_k_quant_file_reads(tmp_path):
    from loratool.checkpoint import open_checkpoint

    path = tmp_path / "mixed.gguf"
    made = write_mixed(path)
    raw = raw_tensors(path)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.config() is None
        assert set(checkpoint.tensors) == set(made)
        for name, (kind, shape) in made.items():
            assert checkpoint[name].shape == shape and checkpoint[name].encoding.storage == kind
            assert torch.equal(checkpoint.read(name), deq(raw[name]).reshape(shape)), name
            assert checkpoint[name].nbytes == raw[name].n_bytes


def test_comfy_orig_shape_is_honoured(tmp_path):
    """ComfyUI-GGUF stores 5-D tensors flattened, with the true shape in `comfy.gguf.orig_shape.<name>`."""
    from loratool.api.merge_gguf import write_gguf_merge
    from loratool.checkpoint import open_checkpoint

    values = np.random.default_rng(1).standard_normal((4, 2, 3, 4, 32)).astype(np.float32)
    stored = quantize(values.reshape(24, 128), Q.Q8_0)
    path = tmp_path / "wan.gguf"
    write_mixed(path, "wan", {"comfy.gguf.orig_shape.patch_embedding.weight": [4, 2, 3, 4, 32]},
                [("patch_embedding.weight", stored, Q.Q8_0)])
    with open_checkpoint(path) as checkpoint:
        assert checkpoint["patch_embedding.weight"].shape == (4, 2, 3, 4, 32)
        base = checkpoint.read("patch_embedding.weight")
        assert torch.equal(base, torch.from_numpy(dequantize(stored, Q.Q8_0)).reshape(4, 2, 3, 4, 32))
        delta = torch.full(base.shape, 0.01)
        write_gguf_merge(checkpoint, {"patch_embedding.weight": ["op"]}, tmp_path / "out.gguf",
                         lambda b, n, ops: b + delta)
    reader = GGUFReader(str(tmp_path / "out.gguf"))
    assert reader.fields["comfy.gguf.orig_shape.patch_embedding.weight"].contents() == [4, 2, 3, 4, 32]
    with open_checkpoint(tmp_path / "out.gguf") as merged:
        written = merged.read("patch_embedding.weight")
        exact = base.double() + delta.double()
        bound = (rtn(exact.float().reshape(24, 128), Q.Q8_0).double() - exact.reshape(24, 128)).norm()
        assert (written.double() - exact).norm() <= 1.05 * bound


# --- merging ----------------------------------------------------------------------------------------


def deltas_for(checkpoint, names, seed=0, size=0.02) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: size * torch.randn(checkpoint[name].shape, generator=generator) for name in names}


def check_merge(base_path: Path, out: Path, deltas: dict[str, torch.Tensor], out_type=None):
    """Merge `deltas` through write_gguf_merge; check the written file against the package's reader."""
    from loratool.api.merge_gguf import write_gguf_merge
    from loratool.checkpoint import open_checkpoint

    with open_checkpoint(base_path) as checkpoint:
        places = dict(checkpoint.places)
        figures, notes = write_gguf_merge(checkpoint, {n: ["op"] for n in deltas}, out,
                                          lambda base, name, ops: base + deltas[name], out_type)
    before, after = raw_tensors(base_path), raw_tensors(out)
    assert list(before) == list(after)
    reader_in, reader_out = GGUFReader(str(base_path)), GGUFReader(str(out))
    for key, entry in reader_in.fields.items():
        if key != "general.file_type" or out_type is None:
            assert [bytes(p) for p in entry.parts] == [bytes(p) for p in reader_out.fields[key].parts], key
    for name, place in places.items():
        old, new = before[place.stored_name], after[place.stored_name]
        if name not in deltas:
            if out_type is None:
                assert new.tensor_type == old.tensor_type and bytes(new.data) == bytes(old.data), name
            continue
        heads = place.rope_heads
        base = deq(old).reshape(place.stored_shape).double()
        exact = base + (permute(deltas[name], heads) if heads else deltas[name]).reshape(place.stored_shape).double()
        written = deq(new).reshape(place.stored_shape).double()
        bound = (rtn(exact.float(), new.tensor_type).double() - exact).norm()
        assert (written - exact).norm() <= 1.05 * bound + 1e-12, name
    assert [f.name for f in figures] == [n for n in places if n in deltas]
    return figures, notes, after


@pytest.mark.parametrize("path", [F16, Q8], ids=["f16", "q8_0"])
def test_merge_keeps_each_tensor_type(tmp_path, path):
    from loratool.checkpoint import open_checkpoint

    with open_checkpoint(path) as checkpoint:
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.norm.weight"]
        deltas = deltas_for(checkpoint, names)
    figures, notes, after = check_merge(path, tmp_path / "out.gguf", deltas)
    assert notes == []
    for figure in figures:
        assert figure.kept > 0.9 and figure.error < 0.1, figure


@pytest.mark.parametrize("arch, alignment", [("flux", None), (None, 64)], ids=["flux", "no-arch-aligned-64"])
def test_k_quants_become_q8_0_with_a_note(tmp_path, arch, alignment):
    path = tmp_path / "mixed.gguf"
    made = write_mixed(path, arch, alignment=alignment)
    from loratool.checkpoint import open_checkpoint

    with open_checkpoint(path) as checkpoint:
        deltas = deltas_for(checkpoint, [n for n in made if n != "final_layer.linear.bias"], size=0.002)
    figures, notes, after = check_merge(path, tmp_path / "out.gguf", deltas)
    for name, (kind, _) in made.items():
        expected = "Q8_0" if kind.endswith("_K") else kind
        assert after[name].tensor_type.name == expected, name
    assert len(notes) == 1 and "cannot write Q4_K, Q5_K, Q6_K" in notes[0] and "as Q8_0" in notes[0]
    encodings = {f.name: f.encoding for f in figures}
    assert encodings["double_blocks.0.img_mlp.0.weight"] == "Q4_K→Q8_0"
    assert encodings["txt_in.weight"] == "Q4_0"


@pytest.mark.parametrize("out_type", ["Q8_0", "F32", "BF16"])
def test_out_type_converts_every_matrix(tmp_path, out_type):
    from loratool.checkpoint import open_checkpoint

    with open_checkpoint(Q8) as checkpoint:
        deltas = deltas_for(checkpoint, ["model.layers.0.self_attn.v_proj.weight"])
        base = {name: checkpoint.read(name) for name in checkpoint.tensors}
    _, _, after = check_merge(Q8, tmp_path / "out.gguf", deltas, out_type)
    assert {t.tensor_type.name for t in after.values() if len(t.shape) >= 2} == {out_type}
    assert {t.tensor_type.name for t in after.values() if len(t.shape) == 1} == {"F32"}
    assert GGUFReader(str(tmp_path / "out.gguf")).fields["general.file_type"].contents() == \
        int(getattr(gguf.LlamaFileType, {"Q8_0": "MOSTLY_Q8_0", "F32": "ALL_F32", "BF16": "MOSTLY_BF16"}[out_type]))
    if out_type == "F32":
        with open_checkpoint(tmp_path / "out.gguf") as merged:
            for name, values in base.items():
                if name not in deltas:
                    assert torch.equal(merged.read(name), values), name


def test_rows_that_do_not_fill_a_block_stay_float():
    from loratool.quant.gguf_codec import requantize

    data, kind, note = requantize(torch.ones(4, 48), "Q4_0")
    assert kind == "F16" and "48" in note and data.nbytes == 4 * 48 * 2
    data, kind, note = requantize(torch.ones(4, 256), "Q6_K")
    assert kind == "Q8_0" and "Q6_K" in note


def test_cli_merge_of_a_peft_adapter_matches_peft_within_rounding(run_cli, tmp_path, hf):
    """`loratool merge base.gguf adapter/` against PEFT's merge of the HF model, requantized once."""
    from transformers import AutoModelForCausalLM

    from helpers import peft_merged_state
    from loratool.checkpoint import open_checkpoint

    out = tmp_path / "merged.gguf"
    ok(run_cli("merge", Q8, FIXTURES / "lora-llama", "-o", out))
    expected = peft_merged_state(AutoModelForCausalLM.from_pretrained(HF), [FIXTURES / "lora-llama"])
    raw = raw_tensors(out)
    with open_checkpoint(Q8) as base, open_checkpoint(out) as merged:
        changed = 0
        for name in hf:
            written = merged.read(name).double()
            if torch.equal(base.read(name), merged.read(name)):
                continue
            changed += 1
            heads = heads_of(name)
            exact = base.read(name).double() + (expected[name].double() - hf[name].double())
            stored = permute(exact, heads) if heads else exact
            rounded = rtn(stored.float(), raw[gguf_name_of(merged, name)].tensor_type).double()
            bound = (rounded - stored).norm()
            assert (written - exact).norm() <= 1.05 * bound, name
    assert changed == 14


# --- refusals ---------------------------------------------------------------------------------------


def test_an_adapter_is_not_a_base(run_cli, tmp_path):
    path = tmp_path / "adapter.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    out = tmp_path / "out.gguf"
    assert_refused(run_cli("merge", path, FIXTURES / "lora-llama", "-o", out), out, "is a LoRA adapter, not a base")


def test_a_truncated_file_is_refused(run_cli, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(Q8.read_bytes()[: Q8.stat().st_size - 1000])
    out = tmp_path / "out.gguf"
    assert_refused(run_cli("merge", path, FIXTURES / "lora-llama", "-o", out), out, str(path), "truncated")


def test_an_unknown_tensor_type_is_named(run_cli, tmp_path):
    """A type id the package does not know, and a type it knows but cannot dequantize (I8)."""
    path = tmp_path / "unknown.gguf"
    write_mixed(path)
    data = bytearray(path.read_bytes())
    name = b"img_in.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == Q.Q8_0
    data[type_at:type_at + 4] = (200).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    out = tmp_path / "out.gguf"
    assert_refused(run_cli("merge", path, FIXTURES / "lora-llama", "-o", out), out, "200", "pip install -U gguf")
    path = tmp_path / "int8.gguf"
    write_mixed(path, extra_tensors=[("scale_shift_table", np.zeros((4, 64), dtype=np.int8), None)])
    assert_refused(run_cli("merge", path, FIXTURES / "lora-llama", "-o", out), out, "I8", "scale_shift_table")


# --- inspect ----------------------------------------------------------------------------------------


def test_inspect_shows_the_type_mix(run_cli, tmp_path):
    import json

    path = tmp_path / "mixed.gguf"
    made = write_mixed(path)
    report = json.loads(ok(run_cli("inspect", path, "--json")).stdout)
    assert report["kind"] == "checkpoint"
    mix = report["dtypes"]
    raw = raw_tensors(path)
    for kind in ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "F16", "F32"):
        assert mix[kind]["tensors"] == sum(1 for k, _ in made.values() if k == kind)
        assert mix[kind]["bytes"] == sum(int(raw[n].n_bytes) for n, (k, _) in made.items() if k == kind)
    total = sum(math.prod(shape) for _, shape in made.values())
    assert report["parameters"] == total
    assert report["bytes_per_parameter"] == pytest.approx(sum(int(t.n_bytes) for t in raw.values()) / total)
    llama = json.loads(ok(run_cli("inspect", Q8, "--json")).stdout)
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["file_type"] == "MOSTLY_Q8_0"
    assert set(llama["dtypes"]) == {"Q8_0", "F32"}
    ok(run_cli("inspect", Q8))


# --- other architectures, written here in llama.cpp's layout -----------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_qwen_and_mistral_files_read_by_hf_names(tmp_path, arch):
    """llama.cpp's layout written with the package's own forward name map (the one its converter uses):
    the reader must give back every transformers name, rows unpermuted only for the llama arch."""
    import transformers

    classes = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "QWEN2"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "QWEN3"),
               "mistral": ("MistralConfig", "MistralForCausalLM", "LLAMA")}
    config_class, model_class, member = classes[arch]
    config = getattr(transformers, config_class)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                                 head_dim=16, tie_word_embeddings=arch == "qwen2")
    torch.manual_seed(0)
    state = {k: v for k, v in getattr(transformers, model_class)(config).state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    kind = getattr(gguf.MODEL_ARCH, member)
    name_map = gguf.get_tensor_name_map(kind, 2)
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[kind])
    writer.add_block_count(2), writer.add_embedding_length(64), writer.add_feed_forward_length(128)
    writer.add_head_count(4), writer.add_head_count_kv(2), writer.add_key_length(16)
    for name, value in state.items():
        stem, suffix = name.rsplit(".", 1)
        tensor_kind, gguf_stem = name_map.get_type_and_name(stem)
        if member == "LLAMA" and tensor_kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            value = permute(value, 4 if tensor_kind == gguf.MODEL_TENSOR.ATTN_Q else 2)
        writer.add_tensor(f"{gguf_stem}.{suffix}", value.detach().numpy().astype(np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    from loratool.checkpoint import open_checkpoint

    with open_checkpoint(path) as checkpoint:
        assert set(checkpoint.tensors) == set(state)
        for name, value in state.items():
            assert torch.equal(checkpoint.read(name), value), name
        assert checkpoint.config()["tie_word_embeddings"] is (arch == "qwen2")
        assert checkpoint.config()["architectures"] == [{"mistral": "LlamaForCausalLM"}.get(arch, model_class)]


def test_cli_merge_of_a_kohya_lora_into_a_flux_gguf(run_cli, tmp_path):
    """A ComfyUI-GGUF-style Flux file (native names, Q8_0 and Q4_K matrices, F32 vectors): the layout is
    detected from the file's names, and a kohya LoRA lands on its tensor within one rounding."""
    from safetensors.torch import save_file

    from loratool.checkpoint import open_checkpoint

    width, rank = 256, 4
    generator = torch.Generator().manual_seed(0)
    shapes = {"double_blocks.0.img_attn.qkv.weight": (3 * width, width), "single_blocks.0.linear1.weight": (7 * width, width),
              "single_blocks.0.linear2.weight": (width, 5 * width), "double_blocks.0.img_attn.qkv.bias": (3 * width,),
              "double_blocks.0.img_attn.norm.key_norm.scale": (width,)}
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator).numpy()
        if len(shape) == 1:
            writer.add_tensor(name, values)
        elif "linear1" in name:
            writer.add_tensor(name, kquant_bytes(*shape, Q.Q4_K, 3), raw_dtype=Q.Q4_K)
        else:
            writer.add_tensor(name, quantize(values, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    down, up = 0.1 * torch.randn(rank, width, generator=generator), 0.1 * torch.randn(3 * width, rank, generator=generator)
    down1, up1 = 0.1 * torch.randn(rank, width, generator=generator), 0.1 * torch.randn(7 * width, rank, generator=generator)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(rank)),
               "lora_unet_single_blocks_0_linear1.lora_down.weight": down1,
               "lora_unet_single_blocks_0_linear1.lora_up.weight": up1,
               "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(float(rank))}, str(lora))
    out = tmp_path / "merged.gguf"
    result = ok(run_cli("merge", path, lora, "-o", out))
    assert "Q4_K" in result.stderr and "Q8_0" in result.stderr  # the K-quant's fallback is said
    before, after = raw_tensors(path), raw_tensors(out)
    for name, delta in (("double_blocks.0.img_attn.qkv.weight", up.double() @ down.double()),
                        ("single_blocks.0.linear1.weight", up1.double() @ down1.double())):
        exact = deq(before[name]).double() + delta
        assert after[name].tensor_type == Q.Q8_0
        bound = (rtn(exact.float(), Q.Q8_0).double() - exact).norm()
        assert (deq(after[name]).double() - exact).norm() <= 1.05 * bound, name
    for name in shapes:
        if "qkv.weight" not in name and "linear1" not in name:
            assert bytes(after[name].data) == bytes(before[name].data), name
    with open_checkpoint(out) as merged:
        assert merged.config() is None
