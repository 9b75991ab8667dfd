"""The parts of `--ray` (issue 22) that need no cluster: per-tensor seeds, balanced groups, option checks,
and that runs without `--ray` never import Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loratool.distributed.groups import balanced_groups
from loratool.distributed.options import ScaleOut
from loratool.errors import UsageError
from loratool.lora.svd import RankRule, tensor_seed
from test_cli_fast import FIXTURES, child_env


def test_tensor_seed_is_a_stable_hash_of_seed_and_name():
    # Fixed values: a change of hash (Python's `hash` of a str differs per process) would show here.
    assert tensor_seed(0, "model.layers.0.self_attn.q_proj.weight") == 703670949295175329
    name = "model.layers.0.self_attn.q_proj.weight"
    assert tensor_seed(1, name) != tensor_seed(0, name)
    assert tensor_seed(0, "a") != tensor_seed(0, "b") and 0 <= tensor_seed(7, "x") < 2**63


def test_randomized_svd_depends_on_seed_and_name_only():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(200, 150, generator=generator)
    rule = RankRule(rank=5, seed=3)
    first = rule.for_tensor("w").factorize(matrix)
    torch.manual_seed(123)  # the caller's random state plays no part
    again = rule.for_tensor("w").factorize(matrix)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = RankRule(rank=5, seed=4).for_tensor("w").factorize(matrix)
    assert not torch.equal(first[0], other[0])


def test_balanced_groups_are_consecutive_runs_of_equal_cost():
    names = [f"t{i}" for i in range(10)]
    costs = [100, 1, 1, 1, 50, 50, 1, 1, 1, 1]
    groups = balanced_groups(names, costs, 3)
    assert [n for g in groups for n in g] == names  # consecutive: each task reads one stretch of the files
    assert [sum(costs[names.index(n)] for n in g) for g in groups] == [100, 53, 54]
    assert balanced_groups(names, costs, 3) == groups
    assert balanced_groups(names[:2], costs[:2], 8) == [["t0"], ["t1"]] and balanced_groups([], [], 4) == []
    even = balanced_groups(list(range(60)), [1] * 60, 8)
    assert len(even) == 8 and {len(g) for g in even} == {7, 8}


@pytest.mark.parametrize("args, message", [
    ((None, "auto", 0.5), "--gpus-per-task applies to runs on a Ray cluster"),
    (("  ", "auto", None), "--ray needs an address"),
    (("auto", "cpu", 0.5), "--gpus-per-task asks for GPUs, but --device is cpu"),
    (("auto", "auto", -1.0), "--gpus-per-task must be a positive number"),
])
def test_scale_out_options_are_checked(args, message):
    with pytest.raises(UsageError, match=message):
        ScaleOut.parse(*args)
    assert ScaleOut.parse(None) is None and ScaleOut.parse(" local ").address == "local"


@pytest.mark.parametrize("device, gpus, asked", [("cuda", None, "--device cuda"), ("auto", 0.5, "--gpus-per-task")])
def test_a_gpu_request_on_a_cluster_without_gpus_names_the_option_that_asked(device, gpus, asked):
    from loratool.distributed.cluster import _device

    class NoGpus:
        @staticmethod
        def cluster_resources():
            return {"CPU": 2.0}

    with pytest.raises(UsageError, match=f"^{asked} asks for GPUs, but the Ray cluster at auto has none"):
        _device(NoGpus, ScaleOut.parse("auto", device, gpus))
    assert _device(NoGpus, ScaleOut.parse("auto", "auto", None)) == ("cpu", 0.0)


def test_single_process_runs_never_import_ray(tmp_path):
    code = ("import sys; from loratool.cli import main; "
            "codes = [main(['svd-extract', sys.argv[1], sys.argv[1], '-r', '2', '-o', sys.argv[2] + '/s']), "
            "main(['merge', sys.argv[1], sys.argv[3], '-o', sys.argv[2] + '/m'])]; "
            "import json; print(json.dumps([codes, 'ray' in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "tiny-llama"), str(tmp_path),
                             str(FIXTURES / "lora-llama")], capture_output=True, text=True, env=child_env(),
                            timeout=120)
    codes, imported = json.loads(result.stdout.strip().splitlines()[-1])
    # svd-extract of a model against itself refuses (nothing changed); both went through their full path
    assert codes == [2, 0] and not imported, result.stderr
