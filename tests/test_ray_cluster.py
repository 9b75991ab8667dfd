"""`--ray` (issue 22) on a real multi-node Ray cluster on this machine: `ray.cluster_utils.Cluster` with a
head node that has no CPUs (so no task can run there, nor in this driver) and two worker nodes of one
CPU each. Every Ray process binds 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, checked below), the
dashboard is off and usage stats are not sent. One cluster serves the whole module; the test that
removes a worker node runs last.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from helpers import make_adapter, tiny_llama
from hub_server import FakeHub
from loratool.checkpoint.output import TEMP_MARK

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "fixtures"
#: What every Ray process of these tests (and the CLI drivers they start) runs with.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
TOKEN = "hf_test_token_do_not_print"


def _listening(*nodes) -> set[str]:
    """The addresses the nodes' processes (GCS, raylets, workers, ...) listen on."""
    import psutil

    pids = set()
    for node in nodes:
        for infos in node.all_processes.values():
            for info in infos:
                root = psutil.Process(info.process.pid)
                pids |= {root.pid, *(p.pid for p in root.children(recursive=True))}
    addresses = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            addresses |= {c.laddr.ip for c in psutil.Process(pid).net_connections("inet")
                          if c.status == psutil.CONN_LISTEN}
    assert addresses, "no listening socket found: the check would be empty"
    return addresses


def _warm(ray, node_id: str) -> int:
    """Start a worker process on `node_id` with torch and loratool imported, so the first job's tasks are
    not all taken by whichever node started its worker first."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def load():
        import loratool.api.merge  # noqa: F401
        import loratool.api.svd_extract  # noqa: F401

        return os.getpid()

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.get(ray.remote(load).options(num_cpus=1, scheduling_strategy=strategy).remote())


@pytest.fixture(scope="module")
def hub():
    """A local Hub-compatible server (tests/hub_server.py) the worker nodes download from."""
    server = FakeHub(token=TOKEN, user="tester")
    yield server
    server.close()


@pytest.fixture(scope="module")
def nodes_hf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nodes_hf_cache")


@pytest.fixture(scope="module")
def cluster(hub, nodes_hf_cache):
    """The nodes' environment: RAY_ENV, and a Hub at `hub` with the nodes' own cache (for hf:// inputs)."""
    nodes_env = {**RAY_ENV, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
                 "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(nodes_hf_cache)}
    saved = {k: os.environ.get(k) for k in nodes_env}
    os.environ.update(nodes_env)
    import ray
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [made.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=made.address, logging_level="ERROR", log_to_driver=False)
    for key, value in saved.items():  # this process's own tests keep their environment
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.environ.update(RAY_ENV)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"} and len(nodes) == 3
        worker_ids = {w.node_id for w in workers}
        for node_id in worker_ids:
            assert _warm(ray, node_id) != os.getpid()
        assert _listening(made.head_node, *workers) <= {"127.0.0.1", "::ffff:127.0.0.1"}
        yield made, workers, worker_ids
    finally:
        ray.shutdown()
        made.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pair(folder: Path, count: int = 12, shape=(128, 96), nan_in: str | None = None) -> tuple[Path, Path]:
    """BASE and FINETUNED files: `count` linears moved by rank-4 + noise updates, norms unchanged."""
    generator = torch.Generator().manual_seed(3)
    base, tuned = {}, {}
    for i in range(count // 2):
        for leaf in ("q_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{leaf}.weight"
            weight = torch.randn(shape, generator=generator)
            delta = torch.randn(shape[0], 4, generator=generator) @ torch.randn(4, shape[1], generator=generator)
            base[name], tuned[name] = weight, weight + 0.01 * delta + 1e-3 * torch.randn(shape, generator=generator)
        norm = f"model.layers.{i}.input_layernorm.weight"
        base[norm] = tuned[norm] = torch.ones(shape[1])
    if nan_in is not None:
        tuned[nan_in][0, 0] = float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, folder / "base.safetensors")
    save_file(tuned, folder / "finetuned.safetensors")
    return folder / "base.safetensors", folder / "finetuned.safetensors"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return _pair(tmp_path_factory.mktemp("ray_pair"))


def _workers_used(report: dict, worker_ids: set[str]) -> dict[str, int]:
    """Per-node task counts of a run, keyed by the worker node whose id the report names."""
    used = {}
    for entry in report["nodes"]:
        prefix = entry["node"].split("/")[1]
        [node_id] = [n for n in worker_ids if n.startswith(prefix)]
        used[node_id] = entry["tasks"]
    assert sum(used.values()) == report["tasks"]
    return used


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _products_differ(first: dict, second: dict) -> float:
    """The largest relative difference of a module's B@A between two adapters' tensors (the factors
    themselves may turn within a subspace; the product is what a merge adds)."""
    assert first.keys() == second.keys()
    worst = 0.0
    for key in (k for k in first if k.endswith("lora_B.weight")):
        other = key.replace("lora_B", "lora_A")
        a, b = (f[key].double().flatten(1) @ f[other].double().flatten(1) for f in (first, second))
        worst = max(worst, _relative(a, b))
    return worst


def test_svd_extract_runs_on_both_workers_repeats_its_bytes_and_matches_the_local_run(cluster, pair, tmp_path,
                                                                                      run_cli):
    _, _, worker_ids = cluster
    base, tuned = pair
    runs = []
    for name in ("first", "second"):
        result = run_cli("svd-extract", base, tuned, "-r", "4", "-o", tmp_path / name, "--ray", "auto", "--json")
        assert result.code == 0, result
        runs.append(json.loads(result.stdout))
    for report in runs:
        assert set(_workers_used(report["cluster"], worker_ids)) == worker_ids  # both workers, never the driver
    first, second = ((tmp_path / n / "adapter_model.safetensors").read_bytes() for n in ("first", "second"))
    assert first == second
    assert run_cli("svd-extract", base, tuned, "-r", "4", "-o", tmp_path / "local").code == 0
    on_cluster = load_file(tmp_path / "first" / "adapter_model.safetensors")
    local = load_file(tmp_path / "local" / "adapter_model.safetensors")
    assert on_cluster.keys() == local.keys() and len(local) == 24
    # The same per-tensor seeds; only BLAS's summation order (1 thread in a task) differs.
    assert _products_differ(on_cluster, local) < 1e-5
    assert json.loads((tmp_path / "first" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "local" / "adapter_config.json").read_text())


def test_merge_gives_the_local_bytes_shard_by_shard(cluster, tmp_path, run_cli):
    _, _, worker_ids = cluster
    args = [FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "--max-shard-size", "100KB"]
    result = run_cli("merge", *args, "-o", tmp_path / "ray", "--ray", "auto", "--json")
    assert result.code == 0, result
    report = json.loads(result.stdout)["cluster"]
    assert report["tasks"] == 5 and set(_workers_used(report, worker_ids)) <= worker_ids
    assert run_cli("merge", *args, "-o", tmp_path / "local").code == 0
    names = sorted(os.listdir(tmp_path / "local"))
    assert sorted(os.listdir(tmp_path / "ray")) == names and any(n.endswith(".index.json") for n in names)
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    single = [FIXTURES / "tiny-llama" / "model.safetensors", FIXTURES / "lora-llama"]
    assert run_cli("merge", *single, "-o", tmp_path / "one.safetensors", "--ray", "auto").code == 0
    assert run_cli("merge", *single, "-o", tmp_path / "one-local.safetensors").code == 0
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "one-local.safetensors").read_bytes()
    assert not [p for p in tmp_path.rglob("*") if TEMP_MARK in p.name]


def test_a_block_scaled_fp8_merge_gives_the_local_bytes_and_rounding_report(cluster, tmp_path, run_cli):
    """Requantized shards (DeepSeek-V3-style 128×128 blocks): the same bytes, and the same rounding
    figures, gathered from the tasks in file order."""
    from test_quantized_fp8 import peft_adapter, tiny_llama_fp8_folder

    model, _ = tiny_llama_fp8_folder(tmp_path / "base")
    peft_adapter(model, tmp_path / "adapter")
    args = [tmp_path / "base", tmp_path / "adapter", "--max-shard-size", "200KB", "--json"]
    on_cluster = run_cli("merge", *args, "-o", tmp_path / "ray", "--ray", "auto")
    local = run_cli("merge", *args, "-o", tmp_path / "local")
    assert on_cluster.code == 0 and local.code == 0, (on_cluster, local)
    ray_json, local_json = json.loads(on_cluster.stdout), json.loads(local.stdout)
    assert ray_json["cluster"]["tasks"] == len(local_json["files"]) > 1
    names = sorted(os.listdir(tmp_path / "local"))
    assert sorted(os.listdir(tmp_path / "ray")) == names
    assert all((tmp_path / "ray" / n).read_bytes() == (tmp_path / "local" / n).read_bytes() for n in names)
    # The figures are float sums over the tensor (BLAS dots), so they agree to rounding, like svd-extract's.
    figures = [(a, b) for a, b in zip(ray_json["rounding"], local_json["rounding"], strict=True)]
    assert figures and all(a["name"] == b["name"] and a["encoding"] == b["encoding"] for a, b in figures)
    assert all(math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6) for a, b in figures
               for k in ("delta_norm", "error", "survived", "aligned"))


def test_resize_and_combine_on_the_cluster_match_the_local_run(cluster, tmp_path):
    from loratool.api.combine import combine
    from loratool.api.resize import resize

    adapters = [FIXTURES / "lora-llama", FIXTURES / "lora-llama-qv"]
    for name, call in (("resize", lambda out, **kw: resize(adapters[0], out, rank=2, **kw)),
                       ("ties", lambda out, **kw: combine(adapters, out, "ties", density=0.5, rank=4, **kw)),
                       ("svd", lambda out, **kw: combine(adapters, out, "svd", rank=3, **kw))):
        result = call(tmp_path / f"{name}-ray", ray="auto")
        assert result.to_json()["cluster"]["tasks"] >= 2, name
        call(tmp_path / f"{name}-local")
        on_cluster = load_file(tmp_path / f"{name}-ray" / "adapter_model.safetensors")
        local = load_file(tmp_path / f"{name}-local" / "adapter_model.safetensors")
        assert _products_differ(on_cluster, local) < 1e-5, name


def test_a_bad_input_in_one_task_fails_the_run_with_its_line(cluster, tmp_path, run_cli):
    base, tuned = _pair(tmp_path / "in", nan_in="model.layers.4.self_attn.v_proj.weight")
    result = run_cli("svd-extract", base, tuned, "-r", "4", "-o", tmp_path / "out", "--ray", "auto")
    assert result.code == 2, result
    assert result.stderr.strip().splitlines() == [
        "Error: model.layers.4.self_attn.v_proj.weight: the difference FINETUNED − BASE holds NaN/Inf"]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


def test_ray_options_are_checked_and_a_missing_ray_names_the_extra(run_cli, tmp_path, monkeypatch):
    base, tuned = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama"
    result = run_cli("svd-extract", base, tuned, "-r", "2", "-o", tmp_path / "o", "--gpus-per-task", "0.5")
    assert result.code == 2 and "--gpus-per-task applies to runs on a Ray cluster" in result.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as it does without the extra
    result = run_cli("merge", base, FIXTURES / "lora-llama", "-o", tmp_path / "m", "--ray", "local")
    assert result.code == 2 and result.stderr.strip().splitlines() == [
        "Error: --ray needs Ray, which is not installed; pip install 'loratool[ray]'"]
    assert not (tmp_path / "m").exists()


def _driver_env(**extra) -> dict:
    env = dict(os.environ, **RAY_ENV, LORATOOL_NO_PROGRESS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _driver(*args, namespace: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    """`loratool ARGS` as its own driver process, optionally inside `namespace` (an `unshare` prefix)."""
    command = [sys.executable, "-m", "loratool", *map(str, args)]
    return subprocess.Popen([*(namespace or []), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_driver_env(**(env or {})))


def _private_mount(folder: Path) -> list[str]:
    """Makes `folder` and returns an `unshare` prefix running a command with an empty tmpfs over it, seen
    by nothing else (the test is skipped where user and mount namespaces are not available)."""
    folder.mkdir()
    prefix = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs none "{folder}" && exec "$0" "$@"']
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces")
    return prefix


def test_an_out_the_workers_cannot_see_is_refused_before_any_work(cluster, tmp_path):
    """The driver writes OUT on a tmpfs that only its own mount namespace has (a node-local disk), so the
    probe file is missing on the workers; the run stops with one line before a shard is written."""
    made, _, _ = cluster
    private = tmp_path / "driver-only"
    namespace = _private_mount(private)
    driver = _driver("merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama", "--max-shard-size", "100KB",
                     "-o", private / "merged", "--ray", made.address, namespace=namespace)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: the folder of OUT, {private}, is not visible from Ray "
                                                   "node(s) 127.0.0.1/"), stderr
    assert lines[0].count("127.0.0.1/") == 2  # both workers named
    assert list(private.iterdir()) == []


@pytest.fixture(scope="module")
def big_merge(tmp_path_factory) -> tuple[Path, Path]:
    """A Llama of about 190 MB in 6 shards, and a rank-16 LoRA on every linear: long enough a merge to
    interrupt while its shard tasks run."""
    folder = tmp_path_factory.mktemp("ray_big")
    model = tiny_llama(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, vocab_size=512,
                       num_attention_heads=8, num_key_value_heads=8)
    model.save_pretrained(folder / "base", max_shard_size="32MB")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    make_adapter(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets), folder / "adapter")
    return folder / "base", folder / "adapter"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_cancels_the_tasks_and_leaves_no_output(cluster, big_merge, tmp_path, signum):
    """(ray.init installs its own SIGTERM handler; loratool's must be the one in force.)"""
    made, _, _ = cluster
    base, adapter = big_merge
    out = tmp_path / "merged"
    driver = _driver("merge", base, adapter, "-o", out, "--ray", made.address)
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.rglob(f"*{TEMP_MARK}part-*")]:  # a task is writing its shard
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.005)
    driver.send_signal(signum)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["Error: interrupted; no output was written"]
    time.sleep(1)  # a cancelled task that went on writing would show up now
    assert list(tmp_path.iterdir()) == []


def test_hf_inputs_are_fetched_by_each_node_into_its_own_cache(cluster, hub, nodes_hf_cache, tmp_path, monkeypatch):
    """The driver resolves hf:// into a cache on a tmpfs only it sees; the worker nodes download the same
    commit into their own cache, and the merge is the local one, byte for byte."""
    import huggingface_hub

    made, _, _ = cluster
    private = tmp_path / "driver-cache"
    namespace = _private_mount(private)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True, raising=False)
    api = huggingface_hub.HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("tester/base")
    api.upload_folder(repo_id="tester/base", folder_path=str(FIXTURES / "tiny-llama"))
    driver = _driver("merge", "hf://tester/base", FIXTURES / "lora-llama", "--max-shard-size", "100KB", "-o",
                     tmp_path / "merged", "--ray", made.address, namespace=namespace,
                     env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                          "HF_HUB_CACHE": str(private)})
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 0, stderr
    assert list(private.iterdir()) == []  # the driver's cache vanished with its namespace
    [fetched] = nodes_hf_cache.glob("models--tester--base/snapshots/*")
    assert (fetched / "model.safetensors").read_bytes() == (FIXTURES / "tiny-llama" / "model.safetensors").read_bytes()
    local = tmp_path / "local"
    assert subprocess.run([sys.executable, "-m", "loratool", "merge", FIXTURES / "tiny-llama", FIXTURES / "lora-llama",
                           "--max-shard-size", "100KB", "-o", local], env=_driver_env()).returncode == 0
    names = sorted(os.listdir(local))
    assert sorted(os.listdir(tmp_path / "merged")) == names
    assert all((tmp_path / "merged" / n).read_bytes() == (local / n).read_bytes() for n in names)


def test_ray_local_starts_a_private_ray_with_the_same_bytes(cluster, pair, tmp_path, run_cli):
    """`--ray local`: a one-node Ray of this run only, on 127.0.0.1, gone afterwards; its tasks run on one
    thread like the cluster's, so the adapter is byte for byte the cluster's."""
    base, tuned = pair
    assert run_cli("svd-extract", base, tuned, "-r", "4", "-o", tmp_path / "cluster", "--ray", "auto").code == 0
    driver = _driver("svd-extract", base, tuned, "-r", "4", "-o", tmp_path / "local", "--ray", "local", "--json")
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 0 and stderr == "", stderr
    report = json.loads(stdout)["cluster"]
    assert report["address"].startswith("127.0.0.1:") and [n["tasks"] for n in report["nodes"]] == [report["tasks"]]
    assert (tmp_path / "local" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "cluster" / "adapter_model.safetensors").read_bytes()


def test_removing_a_worker_node_mid_run_gives_the_same_output(cluster, tmp_path):
    """Runs last: one of the two worker nodes is killed once the first task is done, while the other
    tasks run or wait (8 tasks of exact SVDs, about 0.2 s each); Ray runs them again on the other node,
    and the adapter is byte for byte the one an undisturbed run writes."""
    from loratool.api.svd_extract import svd_extract

    made, workers, worker_ids = cluster
    base, tuned = _pair(tmp_path / "in", count=24, shape=(512, 384))
    svd_extract(base, tuned, tmp_path / "whole", rank=4, exact=True, ray="auto")
    removed = []

    def progress(done: int, total: int) -> None:
        if not removed:
            made.remove_node(workers[1], allow_graceful=False)
            removed.append(workers[1].node_id)

    result = svd_extract(base, tuned, tmp_path / "hurt", rank=4, exact=True, ray="auto", progress=progress)
    assert removed
    assert workers[0].node_id in _workers_used(result.to_json()["cluster"], worker_ids)
    assert (tmp_path / "hurt" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()
