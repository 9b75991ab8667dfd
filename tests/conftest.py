from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORATOOL_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from click.testing import CliRunner  # noqa: E402

from loratool.cli import main  # noqa: E402


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self):
        return f"CliResult(code={self.code}, stdout={self.stdout[-500:]!r}, stderr={self.stderr[-1500:]!r})"


#: What `pytest -m "not slow"` leaves out, for a daily loop under a minute on 2 cores (`make test` runs
#: everything). A file name marks the whole file; `file::test` every case of a test; `file::test[id]` one
#: case. Each takes over about a second on 2 cores, or exports and runs ONNX models. tests/test_suite.py
#: checks that every entry still names a test.
SLOW_TESTS = {
    "test_onnx.py": "ONNX export, onnxruntime sessions and latency runs (about 90 s)",
    "test_ray_cluster.py": "a head and two worker Ray nodes on this machine, and CLI drivers (about 50 s)",
    "test_cli_fast.py::test_inspect_of_adapters_reads_headers_without_torch": "child interpreters, one per format",
    "test_cli_fast.py::test_inspect_of_a_sharded_checkpoint_without_torch": "child interpreters",
    "test_svd_extract.py::test_noisy_deltas_within_two_percent_of_optimal": "full SVDs of noisy matrices",
    "test_svd_extract.py::test_randomized_svd_on_slow_spectra": "full SVDs for the optimum",
    "test_checkpoint_io.py::test_hostile_json_headers_fail_cleanly": "a property test over many headers",
    "test_lycoris_networks.py::test_network_state_dict_parses_and_matches_forward": "LyCORIS' own forward passes",
    "test_lycoris_merge.py::test_lycoris_file_merges_into_a_pipeline": "a LyCORIS network per case, then a merge",
    "test_lycoris_cli.py::test_kohya_lycoris_to_peft_folder_loads_and_merges_to_lycoris_forward": "PEFT's forward per case",
    "test_combine.py::test_dense_methods_match_peft_merge_utils": "dense TIES/DARE on every module, twice",
    "test_gguf_base.py::test_cli_merge_of_a_peft_adapter_matches_peft_within_rounding": "loads transformers and PEFT",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        path, _, name = item.nodeid.partition("::")
        file = Path(path).name
        if {file, f"{file}::{name.split('[')[0]}", f"{file}::{name}"} & set(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def run_cli(monkeypatch):
    """Run `loratool ARGS` in-process through the real `main()` error boundary."""

    def run(*args) -> CliResult:
        with CliRunner().isolation() as (out, err, _):
            code = main([str(a) for a in args])
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
        return CliResult(code, stdout, stderr)

    return run


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")
