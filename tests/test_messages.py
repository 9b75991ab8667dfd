"""Messages and scale (issue 19, item 5): names from files are shown escaped, an error is one line, and
`inspect --tensors` lists a large header completely, as plain lines and as JSON, in linear time."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from helpers import assert_refused, ok
from loratool.errors import printable

FIXTURES = Path(__file__).parent.parent / "fixtures"
EVIL = "evil\n\x1b[31mred[/oops]\u202e"
ESCAPED = "evil\\n\\x1b[31mred[/oops]\\u202e"


def write_header(path: Path, tensors: dict[str, list[int]], dtype: str = "F32", metadata: dict | None = None) -> Path:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON, zeroed data."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def assert_clean(text: str) -> None:
    """Nothing that drives a terminal, and no control character but the line ends."""
    assert "\x1b" not in text and "\u202e" not in text
    assert all(c.isprintable() for line in text.splitlines() for c in line), text


def test_printable_escapes_what_repr_escapes():
    assert printable("plain name.weight") == "plain name.weight"
    assert printable("tab\there") == "tab\\there"
    assert printable(EVIL) == ESCAPED
    assert printable("中文 é") == "中文 é"
    assert printable("\x85\u2028\udcff") == "\\x85\\u2028\\udcff"


@pytest.fixture
def evil_files(tmp_path):
    module = f"lora_unet_{EVIL}"
    return {
        "checkpoint": write_header(tmp_path / "ckpt.safetensors", {f"model.{EVIL}.weight": [4, 4], "model.ok.weight": [2]},
                                   metadata={"note": EVIL}),
        "kohya": write_header(tmp_path / "kohya.safetensors", {f"{module}.lora_down.weight": [2, 4],
                                                               f"{module}.lora_up.weight": [4, 2], f"{module}.alpha": []}),
    }


@pytest.mark.parametrize("args", [[], ["--tensors"], ["--check"], ["--json", "--tensors"]],
                         ids=["summary", "tensors", "check", "json"])
@pytest.mark.parametrize("kind", ["checkpoint", "kohya"])
def test_inspect_shows_names_escaped(run_cli, evil_files, kind, args):
    result = ok(run_cli("inspect", evil_files[kind], *args))
    assert_clean(result.stdout)
    assert_clean(result.stderr)
    if "--json" in args:
        report = json.loads(result.stdout)
        assert any(EVIL in t["name"] for t in report["tensor_list"])  # JSON escapes by itself, and keeps the name
    else:
        assert ESCAPED in result.stdout  # shown, escaped, and not read as rich markup ([/oops])


def test_merge_error_naming_a_hostile_module_is_one_escaped_line(run_cli, tmp_path, evil_files):
    line = assert_refused(run_cli("merge", FIXTURES / "tiny-llama", evil_files["kohya"], "-o", tmp_path / "out"),
                          tmp_path / "out", ESCAPED)
    assert_clean(line)
    result = run_cli("merge", FIXTURES / "tiny-llama", evil_files["kohya"], "-o", tmp_path / "out", "--json")
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert_clean(result.stderr)
    assert ESCAPED in json.loads(result.stdout)["error"]


def test_an_output_path_with_control_characters_is_escaped(run_cli, tmp_path):
    out = tmp_path / "x\ny\x1b[0m"
    out.mkdir()
    (out / "keep").write_text("keep")
    line = assert_refused(run_cli("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "-o", out), None,
                          "already exists", "x\\ny\\x1b[0m")
    assert_clean(line)


def test_notes_are_escaped(capsys):
    from loratool.cli.output import Output

    Output().note(f"module {EVIL} skipped")
    err = capsys.readouterr().err
    assert ESCAPED in err and len(err.strip().splitlines()) == 1
    assert_clean(err)


def test_the_interrupt_line_escapes_the_published_path():
    from loratool import interrupts

    with interrupts.armed():
        interrupts.published(Path("/tmp/a\nb"))
        assert interrupts.message() == ("Error: interrupted after writing; the complete output is in place at "
                                        "/tmp/a\\nb")
    with interrupts.armed():
        assert interrupts.message() == interrupts.MESSAGE


# --- inspect --tensors at scale ----------------------------------------------------------------------------

N = 50_000


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """50k tensors in a shuffled order: scalars, vectors, matrices, zero-size ones, names of every length."""
    import random

    rng = random.Random(0)
    shapes = [[], [3], [2, 5], [0, 7], [1, 1, 1, 2]]
    tensors = {f"blocks.{i}.{'x' * (i % 37)}.w{i % 5}": shapes[i % 5] for i in range(N)}
    items = list(tensors.items())
    rng.shuffle(items)
    path = write_header(tmp_path_factory.mktemp("large") / "large.safetensors", dict(items))
    return path, tensors


def test_inspect_tensors_lists_a_large_header_completely(run_cli, large):
    path, tensors = large
    lines = ok(run_cli("inspect", path, "--tensors")).stdout.splitlines()
    start = lines.index("tensors")
    header, rows = lines[start + 1], lines[start + 2:start + 2 + N]
    assert header.split() == ["name", "dtype", "shape", "size"]
    assert len(rows) == N and len(lines) == start + 2 + N  # nothing after the listing (no metadata, no check)
    names = sorted(tensors)
    for name, row in zip(names, rows):
        cells = row.split()
        shape = "×".join(map(str, tensors[name])) or "scalar"
        size = 4 * (eval("*".join(map(str, tensors[name]))) if tensors[name] else 1)
        assert cells[:3] == [name, "F32", shape] and " ".join(cells[3:]) == f"{size} B", (name, row)
    # Columns line up: every dtype starts at the same column.
    width = header.index("dtype")
    assert all(row[width:width + 3] == "F32" for row in rows if len(row.split()[0]) < width)


def test_inspect_tensors_json_lists_a_large_header_completely(run_cli, large):
    path, tensors = large
    report = json.loads(ok(run_cli("inspect", path, "--tensors", "--json")).stdout)
    assert report["tensors"] == N
    listed = report["tensor_list"]
    assert [t["name"] for t in listed] == sorted(tensors)
    for entry in listed:
        shape = tensors[entry["name"]]
        size = 4
        for dim in shape:
            size *= dim
        assert entry == {"name": entry["name"], "dtype": "F32", "shape": shape, "bytes": size,
                         "file": "large.safetensors"}


def test_an_empty_listing(run_cli, tmp_path):
    path = write_header(tmp_path / "empty.safetensors", {})
    assert ok(run_cli("inspect", path, "--tensors")).stdout.splitlines()[-2:] == ["tensors", "name  dtype  shape  size"]
    assert json.loads(ok(run_cli("inspect", path, "--tensors", "--json")).stdout)["tensor_list"] == []


def test_json_rows_are_the_same_document(run_cli):
    """The streamed `tensor_list` is the JSON document `json.dumps` would give, only laid out per row."""
    from loratool.api.inspect import inspect

    result = ok(run_cli("inspect", FIXTURES / "tiny-llama", "--tensors", "--json"))
    assert json.loads(result.stdout) == json.loads(json.dumps(inspect(FIXTURES / "tiny-llama", tensors=True)))
    empty = ok(run_cli("inspect", FIXTURES / "tiny-llama", "--json"))
    assert "tensor_list" not in json.loads(empty.stdout)
