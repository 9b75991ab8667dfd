"""The checkpoint layer on its own: header validation, lazy reads, the streaming writer, indexes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loratool.checkpoint import open_checkpoint, read_header
from loratool.checkpoint.writer import PlannedTensor, SafetensorsWriter, plan_shards, shard_names, write_index
from loratool.cli.params import parse_size
from loratool.errors import InvalidCheckpointError, LoratoolError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool, torch.float64]


def sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def test_reader_matches_safetensors(tmp_path):
    tensors = {f"t{i}": sample(d, (3, 5), i) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    with open_checkpoint(tmp_path / "x.safetensors") as ckpt:
        assert set(ckpt) == set(tensors)
        assert ckpt.metadata["x.safetensors"] == {"k": "v"}
        for name, expected in tensors.items():
            assert torch.equal(ckpt.read(name), expected), name
            assert ckpt[name].shape == tuple(expected.shape)


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = {f"t{i}": sample(d, (4, 3), i) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(1.0, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "src.safetensors")
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "out.safetensors", plan)
    with open_checkpoint(tmp_path / "src.safetensors") as src:
        for i, item in enumerate(plan):
            if i % 2:
                writer.copy_raw(item.name, src.fd(src[item.name].path), src[item.name])
            else:
                writer.write(item.name, src.read(item.name))
    writer.finish()
    loaded = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert read_header(tmp_path / "out.safetensors").metadata == {"format": "pt"}
    assert (read_header(tmp_path / "out.safetensors").data_start) % 8 == 0


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = SafetensorsWriter(tmp_path / "w.safetensors", [PlannedTensor("a", torch.float32, (2,))])
    with pytest.raises(RuntimeError):
        writer.write("b", torch.zeros(2))
    writer.close()


def test_shard_planning_and_index(tmp_path):
    items = [PlannedTensor(f"w{i}", torch.float32, (100,)) for i in range(10)]  # 400 bytes each
    shards = plan_shards(items, 1000)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert plan_shards([PlannedTensor("big", torch.float32, (1000,))], 10)[0][0].name == "big"
    names = shard_names(len(shards))
    assert names[0] == "model-00001-of-00005.safetensors" and shard_names(1) == ["model.safetensors"]
    write_index(tmp_path / "model.safetensors.index.json", dict(zip(names, shards)))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000 and index["weight_map"]["w9"] == names[-1]


def test_index_inconsistencies_are_reported(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(InvalidCheckpointError, match="'b' listed but not stored"):
        open_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(InvalidCheckpointError, match="plain file names"):
        open_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "missing.safetensors"}}))
    with pytest.raises(InvalidCheckpointError, match="missing"):
        open_checkpoint(index)


def test_folder_without_index_and_duplicates(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "two.safetensors")
    assert set(open_checkpoint(tmp_path)) == {"a", "b"}
    save_file({"a": torch.ones(2)}, tmp_path / "three.safetensors")
    with pytest.raises(InvalidCheckpointError, match="stored twice"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1.5kb", 1500), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "5XB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=256))
def test_random_bytes_never_crash(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    with pytest.raises(LoratoolError):
        read_header(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=5),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
                           max_leaves=12),
       data=st.binary(max_size=64))
def test_hostile_json_headers_fail_cleanly(tmp_path, header, data):
    encoded = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    try:
        parsed = read_header(path)
    except LoratoolError:
        return
    for info in parsed.tensors.values():  # anything accepted must be readable exactly within the file
        assert info.data_start + info.nbytes <= path.stat().st_size


def test_blockwise_merge_finishes_every_block_after_a_nan():
    """With --allow-nonfinite a NaN must not leave later row blocks unwritten."""
    from loratool.lora.delta import add_deltas_blockwise

    weight = torch.randn(8, 4, dtype=torch.float64).float()
    left, right = torch.randn(8, 2), torch.randn(2, 4)
    left[0, 0] = float("nan")
    out = torch.full_like(weight, 7.0)
    low, high = add_deltas_blockwise(weight, out, [(left, right, 0.5, 0)], block_elements=8)  # 2 rows per block
    assert low != low and high != high
    expected = weight.double() + 0.5 * left.double() @ right.double()
    assert torch.allclose(out[2:].double(), expected[2:], atol=1e-6)


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
def test_large_file_writer_paths_give_identical_bytes(tmp_path, monkeypatch, direct):
    """Files past DIRECT_MIN_BYTES go through the aligned O_DIRECT staging buffer (or, where the
    filesystem refuses it, the page cache); both must produce exactly the bytes of the small-file path."""
    import loratool.checkpoint.writer as writer_module

    tensors = {f"t{i}": sample(d, (37, 11 + i), i) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(3.0)
    save_file(tensors, tmp_path / "src.safetensors")
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]

    def write(path):
        writer = SafetensorsWriter(path, plan)
        with open_checkpoint(tmp_path / "src.safetensors") as src:
            for i, item in enumerate(plan):
                if i % 2:
                    writer.copy_raw(item.name, src.fd(src[item.name].path), src[item.name])
                elif i % 3:
                    writer.write(item.name, src.read(item.name))
                else:  # streamed in row chunks, as merge does with large tensors
                    writer.begin(item.name)
                    rows = src[item.name].shape[0] if src[item.name].shape else 0
                    if rows:
                        for start in range(0, rows, 5):
                            writer.append(src.read_rows(item.name, start, min(start + 5, rows)))
                    else:
                        writer.append(src.read(item.name).reshape(1))
                    writer.end()
        writer.finish()

    write(tmp_path / "small.safetensors")
    monkeypatch.setattr(writer_module, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(writer_module, "STAGING_BYTES", 8192)  # many aligned flushes, with carried remainders
    monkeypatch.setenv("LORATOOL_NO_DIRECT_IO", "0" if direct else "1")
    sinks = []
    real_init = writer_module._DirectSink.__init__
    monkeypatch.setattr(writer_module._DirectSink, "__init__", lambda self, *a: sinks.append(1) or real_init(self, *a))
    write(tmp_path / "large.safetensors")
    if not direct:
        assert not sinks
    assert (tmp_path / "large.safetensors").read_bytes() == (tmp_path / "small.safetensors").read_bytes()
    loaded = load_file(tmp_path / "large.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_header_tensors_know_shapes_and_read_scalars(tmp_path, dtype):
    """What inspect reads without torch: shapes, sizes, and a scalar's value from its bytes."""
    from loratool.checkpoint import open_checkpoint

    state = {"alpha": torch.tensor(3.140625 if dtype.is_floating_point else 7, dtype=dtype),
             "A": torch.zeros(4, 6, 1, 1, dtype=dtype)}
    save_file(state, str(tmp_path / "x.safetensors"))
    with open_checkpoint(tmp_path / "x.safetensors") as checkpoint:
        tensors = checkpoint.load_all(header_only=True)
    assert tensors["alpha"].reshape(()).item() == state["alpha"].item()
    A = tensors["A"]
    assert (A.shape, A.dim(), A.numel(), A.element_size()) == ((4, 6, 1, 1), 4, 24, state["A"].element_size())
    assert A.reshape(-1).shape == (24,) and A.reshape(4, -1).shape == (4, 6)
    with pytest.raises(ValueError):
        A.item()
