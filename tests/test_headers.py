"""Issue 19, item 3 (headers): a safetensors header is bounded before it is parsed (nesting depth, value
count), refuses duplicated keys as the safetensors library does, refuses NaN/Infinity, and refuses
shapes whose extent is absurd. Each is one `Error:` line naming the file and the key, exit 2, nothing
written. Hostile headers are built by hand."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from helpers import FIXTURES, assert_refused
from loratool.errors import InvalidCheckpointError
from loratool.jsonio import Limits, parse_json

ADAPTER = FIXTURES / "lora-llama"
ENTRY = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


def write_safetensors(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused_everywhere(run_cli, tmp_path, path, *needles):
    """inspect (with --check) and merge both refuse `path` with the same one line, and merge writes
    nothing."""
    line = assert_refused(run_cli("inspect", path, "--check"), None, path.name, *needles)
    out = tmp_path / "out.safetensors"
    assert assert_refused(run_cli("merge", path, ADAPTER, "-o", out), out, *needles) == line
    return line


@pytest.mark.parametrize("header,key", [
    ('{"w": %s, "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}' % ENTRY, "'w'"),
    ('{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}', "'dtype'"),
    ('{"w": %s, "__metadata__": {"a": "1", "a": "2"}}' % ENTRY, "'a'"),
])
def test_duplicated_keys_are_refused(run_cli, tmp_path, header, key):
    path = write_safetensors(tmp_path / "dup.safetensors", header, b"\0" * 8)
    refused_everywhere(run_cli, tmp_path, path, key, "appears twice")


@pytest.mark.parametrize("header", [
    "[" * 100_000 + "]" * 100_000,
    '{"w": %s, "__metadata__": {"x": %s1%s}}' % (ENTRY, "[" * 100_000, "]" * 100_000),
    '{"w": ' + '{"a": ' * 70 + "1" + "}" * 70 + "}",
    "[1," * 50_000 + "]" * 50_000,  # depth that no run of brackets shows
    "[" * 100_000 + "}" * 100_000,  # and brackets that do not even match
])
def test_deep_nesting_is_refused_before_parsing(run_cli, tmp_path, header):
    path = write_safetensors(tmp_path / "deep.safetensors", header)
    refused_everywhere(run_cli, tmp_path, path, "nested more than 64 levels")


def test_brackets_inside_strings_do_not_count(run_cli, tmp_path):
    """kohya and diffusers keep JSON text in metadata strings: brackets there are not nesting."""
    text = json.dumps({"deep": "[" * 1000, "escaped": '\\"[[[[' * 100, "both": '{"a": [[[["' * 50})
    header = json.dumps({"w": json.loads(ENTRY), "__metadata__": {"ss_network_args": text}})
    path = write_safetensors(tmp_path / "ok.safetensors", header, b"\0" * 4)
    result = run_cli("inspect", path, "--json")
    assert result.code == 0, result
    assert json.loads(result.stdout)["metadata"]["ok.safetensors"]["ss_network_args"] == text


def test_value_count_and_bytes_are_bounded():
    limits = Limits(max_bytes=10_000, max_values=1_000, max_depth=8)
    with pytest.raises(InvalidCheckpointError, match="1,001 JSON values, over the limit of 1,000"):
        parse_json("[" + ",".join("0" * 1000) + "]", "f.json", limits=limits, expect=None)
    assert len(parse_json("[" + ",".join("0" * 999) + "]", "f.json", limits=limits, expect=None)) == 999
    with pytest.raises(InvalidCheckpointError, match="over the 10,000-byte limit"):
        parse_json(" " * 10_001, "f.json", limits=limits)
    with pytest.raises(InvalidCheckpointError, match="nested more than 8 levels"):
        parse_json("[" * 9 + "]" * 9, "f.json", limits=limits, expect=None)
    assert parse_json("[" * 8 + "]" * 8, "f.json", limits=limits, expect=None) == [[[[[[[[]]]]]]]]


@pytest.mark.parametrize("value,shown", [("NaN", "NaN"), ("-Infinity", "-Infinity"), ("1e999", "1e999")])
def test_nonfinite_numbers_are_refused_naming_the_key(run_cli, tmp_path, value, shown):
    header = '{"w": %s, "__metadata__": {"lora_alpha": %s}}' % (ENTRY, value)
    path = write_safetensors(tmp_path / "nan.safetensors", header, b"\0" * 4)
    refused_everywhere(run_cli, tmp_path, path, "'__metadata__'['lora_alpha']", shown)


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 4], [2**31, 2**31], [2**40, 0, 2**40], [2] * 70])
def test_absurd_shapes_are_refused(run_cli, tmp_path, shape):
    """`[0, 2**63]` holds no data yet cannot exist as a tensor (torch's strides overflow): refused
    from the header, as every extent of 2^63 bytes or more is, even under inspect --check."""
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    path = write_safetensors(tmp_path / "huge.safetensors", header)
    refused_everywhere(run_cli, tmp_path, path, "'w'", "absurd shape")


def test_a_shape_that_disagrees_with_its_bytes_is_refused(run_cli, tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}})
    path = write_safetensors(tmp_path / "short.safetensors", header, b"\0" * 4)
    refused_everywhere(run_cli, tmp_path, path, "'w'", "span 4 bytes")


def test_empty_tensors_of_sane_shape_still_read(run_cli, tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [0, 4096], "data_offsets": [0, 0]},
                         "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path = write_safetensors(tmp_path / "empty.safetensors", header, b"\0" * 4)
    result = run_cli("inspect", path, "--check", "--json")
    assert result.code == 0, result
    assert json.loads(result.stdout)["tensors"] == 2


def test_sharded_index_is_a_bounded_json_object(run_cli, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "tiny-llama", folder)
    index = folder / "model.safetensors.index.json"
    for text, needle in [("[]", "expected a JSON object, found a list"),
                         ('{"weight_map": {}, "weight_map": {}}', "'weight_map' appears twice"),
                         ('{"metadata": {"total_size": NaN}, "weight_map": {}}', "'metadata'['total_size'] is NaN"),
                         ("[" * 10_000 + "]" * 10_000, "nested more than 64 levels")]:
        index.write_text(text)
        assert_refused(run_cli("inspect", folder), None, index.name, needle)
        out = tmp_path / "out"
        assert_refused(run_cli("merge", folder, ADAPTER, "-o", out), out, index.name, needle)


def test_a_file_rewritten_in_place_is_read_anew(tmp_path):
    """A command reuses a header it parsed moments ago only while the bytes are the same: a file
    rewritten in place, same size, within one timestamp tick, is read as it now is."""
    import torch
    from safetensors.torch import save_file

    from loratool.checkpoint import read_header

    path = tmp_path / "x.safetensors"
    save_file({"aaaa": torch.zeros(2)}, str(path))
    assert list(read_header(path).tensors) == ["aaaa"]
    size = path.stat().st_size
    save_file({"bbbb": torch.ones(2)}, str(path))
    assert path.stat().st_size == size
    assert list(read_header(path).tensors) == ["bbbb"]
