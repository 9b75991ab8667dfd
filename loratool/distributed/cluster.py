"""Joining the Ray cluster named by `--ray`, and what each task asks it for.

`auto` is Ray's own: RAY_ADDRESS when set, else the cluster `ray start` made on this node. `ray://…` is
a Ray client address, HOST:PORT a cluster's GCS, and `local` a private one-node Ray for this run, bound
to 127.0.0.1 (every port it opens) and without a dashboard. A cluster loratool joined is left as it was
(only this driver disconnects); a private one is shut down with the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import LoratoolError, UsageError
from .options import TASK_THREADS, ScaleOut


class ClusterError(LoratoolError):
    """The Ray cluster cannot be reached, cannot run the tasks, or lost them beyond Ray's retries."""


#: Ray reads this when it is imported: "0" binds every process of a Ray it starts to 127.0.0.1 (Linux).
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(local: bool = False) -> Any:
    """The `ray` module; with `local` (a private Ray for this run), imported so that the Ray it starts
    listens on the loopback address only, unless the caller set LOOPBACK_ONLY themselves."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed; pip install 'loratool[ray]'") from None
    return ray


@dataclass(frozen=True)
class Session:
    """A connected driver: the `ray` module, the device tasks compute on and the GPUs each asks for."""

    ray: Any
    address: str
    device: str  # "cpu" or "cuda", as the tasks see it
    gpus_per_task: float

    @property
    def resources(self) -> dict:
        return {"num_cpus": TASK_THREADS, "num_gpus": self.gpus_per_task}

    def slots(self) -> int:
        """How many tasks the cluster runs at once."""
        per_node = []
        for node in self.worker_nodes():
            free = node.get("Resources", {})
            count = int(free.get("CPU", 0) // TASK_THREADS)
            if self.gpus_per_task:
                count = min(count, int(free.get("GPU", 0) / self.gpus_per_task + 1e-9))
            per_node.append(count)
        return max(1, sum(per_node))

    def worker_nodes(self) -> list[dict]:
        """The alive nodes that can run one task (enough CPUs, and GPUs when asked for)."""
        needed = {"CPU": TASK_THREADS, "GPU": self.gpus_per_task}
        return [node for node in self.ray.nodes() if node.get("Alive")
                and all(node.get("Resources", {}).get(key, 0) >= amount for key, amount in needed.items() if amount)]


def node_name(node_id: str, ip: str) -> str:
    """How a node is named in reports: its IP and the start of its Ray node id (one machine may hold many)."""
    return f"{ip}/{node_id[:8]}"


def _device(ray: Any, options: ScaleOut) -> tuple[str, float]:
    gpus_in_cluster = ray.cluster_resources().get("GPU", 0)
    wants_gpu = options.device == "cuda" or options.gpus_per_task is not None or \
        (options.device == "auto" and gpus_in_cluster > 0)
    if not wants_gpu:
        return "cpu", 0.0
    if gpus_in_cluster <= 0:
        asked = "--gpus-per-task" if options.gpus_per_task is not None else f"--device {options.device}"
        raise UsageError(f"{asked} asks for GPUs, but the Ray cluster at {options.address} has none")
    return "cuda", float(options.gpus_per_task or 1)


def _init(ray: Any, address: str) -> None:
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address == "local":
        kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first}") from e
    finally:
        for signum, handler in handlers.items():  # ray.init takes SIGTERM; loratool's handler cleans up
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)


def _joined(ray: Any, address: str) -> str:
    """The cluster's own address (what `auto` resolved to), for reports; `address` where Ray cannot say."""
    try:
        return ray.get_runtime_context().gcs_address or address
    except Exception:  # noqa: BLE001 - Ray client sessions may not know it
        return address


@contextlib.contextmanager
def connect(options: ScaleOut) -> Iterator[Session]:
    """A driver session on the cluster; a driver already connected (an API caller's) is used as it is."""
    ray = import_ray(local=options.address == "local")
    owned = not ray.is_initialized()
    if owned:
        _init(ray, options.address)
    try:
        device, gpus = _device(ray, options)
        yield Session(ray, _joined(ray, options.address), device, gpus)
    finally:
        if owned:
            with contextlib.suppress(Exception):
                ray.shutdown()
