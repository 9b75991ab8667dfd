"""Benchmark `svd-extract --ray`: one Ray worker node against two, and against the plain run, in one run.

Builds a float32 BASE/FINETUNED pair of about --size bytes together (default 512MB; the figures in
docs/scale-out.md are from --size 2GB), made of 2048×2048 linears, each moved by a rank-64 update plus
noise. Then times svd-extract at rank 16 (randomized SVD, the default):
  plain     the single-process run on one thread, in a fresh interpreter pinned to core 0, at Ray's worker
            niceness (15): the same CPU, and the same share of it on a busy machine, as worker node 1
  1 node    --ray on a local Ray cluster: a head node without CPUs (driver, GCS: any core) and worker node 1
            of 1 CPU, whose processes are pinned to core 0
  2 nodes   the same cluster after worker node 2 (1 CPU, pinned to core 1) joins
Pinned, each node does its reading, arithmetic and Ray bookkeeping on its own core, as a one-CPU
machine would (unpinned, one node's reader thread would borrow the idle second core).
and prints the ratios: speed-up (1 node / 2 nodes, aim ≥ 1.7) and Ray's overhead (1 node / plain, aim
≤ 1.15), with the load average before and after (other work on the machine shows up there, and in the
per-node task seconds). Each configuration runs 3 times, best counts. Each worker node is warmed first
(its worker process imports torch once), as on a cluster that runs long jobs; the inputs sit in the page
cache after they are written. Every Ray process binds 127.0.0.1, without a dashboard or usage stats. On
a machine with more cores, --cpus-per-node gives each worker node more task slots (one thread a task).

Usage: python benchmarks/bench_scale.py [--size 2GB] [--rank 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loratool.api.svd_extract import svd_extract  # noqa: E402
from loratool.cli.params import parse_size  # noqa: E402

SIDE = 2048
ROOT = Path(__file__).resolve().parent.parent


def make_pair(folder: Path, size: int) -> tuple[Path, Path]:
    """BASE and FINETUNED of `size` bytes together, in 2048×2048 float32 linears."""
    count = max(2, -(-size // (2 * SIDE * SIDE * 4)))
    generator = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i in range(count):
        name = f"model.layers.{i // 4}.self_attn.{('q', 'k', 'v', 'o')[i % 4]}_proj.weight"
        weight = torch.randn(SIDE, SIDE, generator=generator) * 0.02
        update = torch.randn(SIDE, 64, generator=generator) @ torch.randn(64, SIDE, generator=generator) * 1e-4
        base[name], tuned[name] = weight, weight + update + 1e-5 * torch.randn(SIDE, SIDE, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, folder / "base.safetensors")
    save_file(tuned, folder / "finetuned.safetensors")
    return folder / "base.safetensors", folder / "finetuned.safetensors"


#: The plain run, in a fresh interpreter as a Ray worker process is one (a process that has just built
#: the pair has its allocator warmed up by it, and runs the same job about 1.5x faster on this machine).
PLAIN = """
import os, shutil, sys, time, torch
os.nice(int(sys.argv[6]))
if sys.argv[7]:
    os.sched_setaffinity(0, {int(c) for c in sys.argv[7].split(",")})
torch.set_num_threads(int(sys.argv[4]))
from loratool.api.svd_extract import svd_extract
best = None
for _ in range(RUNS):
    shutil.rmtree(sys.argv[3], ignore_errors=True)
    started = time.perf_counter()
    svd_extract(sys.argv[1], sys.argv[2], sys.argv[3], rank=int(sys.argv[5]))
    best = min(best or 1e9, time.perf_counter() - started)
print(best)
"""
#: Each configuration runs this many times; the best time counts (a shared machine is noisy).
RUNS = 3
#: Ray runs its worker processes at this niceness (its `worker_niceness` default). On a machine shared
#: with other work, a niceness-15 process gets a smaller share of the cores than a niceness-0 one, which
#: is Ray protecting its own daemons, not Ray's overhead; the plain run gets the same niceness (--plain-nice).
RAY_WORKER_NICENESS = 15


def plain(base: Path, tuned: Path, out: Path, threads: int, rank: int, niceness: int, cores: set[int] | None) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    pinned = ",".join(map(str, sorted(cores))) if cores else ""
    run = subprocess.run([sys.executable, "-c", PLAIN.replace("RUNS", str(RUNS)), str(base), str(tuned), str(out),
                          str(threads), str(rank), str(niceness), pinned], capture_output=True, text=True, env=env,
                         check=True)
    seconds = float(run.stdout.strip().splitlines()[-1])
    print(f"{'plain':8s} {seconds:7.2f} s  (one process, {threads} thread(s), niceness {niceness}, cores "
          f"{pinned or 'all'})", flush=True)
    return seconds


def node_cores(index: int, cpus: int) -> set[int] | None:
    """The cores worker node `index` is pinned to: its own `cpus` of them, or None where that cannot be."""
    wanted = set(range(index * cpus, (index + 1) * cpus))
    if not hasattr(os, "sched_getaffinity") or not wanted <= os.sched_getaffinity(0):
        return None
    return wanted


def add_node(cluster, cpus: int, cores: set[int] | None):
    """A worker node of `cpus` CPUs whose processes (raylet, agents, workers) run on `cores` only: a
    node of one CPU does its reading, arithmetic and Ray bookkeeping on that one CPU, as on a cluster."""
    if cores is None:
        return cluster.add_node(num_cpus=cpus)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # the node's processes inherit it
    try:
        return cluster.add_node(num_cpus=cpus)
    finally:
        os.sched_setaffinity(0, before)


def on_cluster(label: str, out: Path, *args, **kwargs) -> float:
    best, result = None, None
    for _ in range(RUNS):
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        result = svd_extract(*args, out, **kwargs)
        best = min(best or 1e9, time.perf_counter() - started)
    nodes = result.to_json()["cluster"]["nodes"]
    where = ", ".join(f"{n['node']}: {n['tasks']} tasks, {n['seconds']:.2f} s in tasks" for n in nodes)
    print(f"{label:8s} {best:7.2f} s  ({where})", flush=True)
    return best


def warm(ray, node_id: str) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def load():
        import loratool.api.svd_extract  # noqa: F401

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    ray.get(ray.remote(load).options(num_cpus=1, scheduling_strategy=strategy).remote())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512MB", help="BASE + FINETUNED bytes (e.g. 2GB)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="Write the pair here and keep it")
    parser.add_argument("--plain-nice", type=int, default=RAY_WORKER_NICENESS,
                        help="Niceness of the plain run (default: Ray's for its workers)")
    options = parser.parse_args()
    folder = options.keep or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        started = time.perf_counter()
        base, tuned = make_pair(folder / "pair", parse_size(options.size))
        pair_bytes = base.stat().st_size + tuned.stat().st_size
        print(f"pair: {pair_bytes / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s; rank {options.rank}, "
              f"{os.cpu_count()} cores here, load average {os.getloadavg()[0]:.2f} before the runs", flush=True)

        cores = [node_cores(i, options.cpus_per_node) for i in range(2)]
        single = plain(base, tuned, folder / "plain", options.cpus_per_node, options.rank, options.plain_nice, cores[0])

        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            first = add_node(cluster, options.cpus_per_node, cores[0])
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
            warm(ray, first.node_id)
            one = on_cluster("1 node", folder / "one", base, tuned, rank=options.rank, ray="auto")
            second = add_node(cluster, options.cpus_per_node, cores[1])
            warm(ray, second.node_id)
            two = on_cluster("2 nodes", folder / "two", base, tuned, rank=options.rank, ray="auto")
            same = (folder / "one" / "adapter_model.safetensors").read_bytes() == \
                (folder / "two" / "adapter_model.safetensors").read_bytes()
        finally:
            ray.shutdown()
            cluster.shutdown()
        print(f"speed-up, 2 nodes over 1: {one / two:.2f}x (aim >= 1.7)")
        print(f"Ray overhead, 1 node over plain: {one / single:.2f}x (aim <= 1.15)")
        print(f"1-node and 2-node adapters byte-identical: {same}; load average {os.getloadavg()[0]:.2f} after")
    finally:
        if options.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
