"""What runs inside a Ray task: the job's own function, on a fixed number of threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def execute(call: Callable, threads: int, *args) -> tuple[Any, str, str, float]:
    """(call(*args), this node's id, its IP, seconds). The thread count is set here, not inherited, so
    every node sums in the same order. `args` come one by one, so that Ray resolves object refs in them."""
    import ray
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    result = call(*args)
    context = ray.get_runtime_context()
    return result, context.get_node_id(), ray.util.get_node_ip_address(), time.perf_counter() - started
