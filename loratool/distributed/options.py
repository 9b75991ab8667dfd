"""The scale-out options as the API receives them, checked without importing Ray."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

#: Each task runs its arithmetic on this many threads, and asks Ray for as many CPUs. Fixed, so that a
#: task's float32 sums are added in the same order on every node (BLAS splits its work by thread count).
TASK_THREADS = 1


@dataclass(frozen=True)
class ScaleOut:
    """Where to run (`address`: auto, local, ray://host:port or host:port) and on what device."""

    address: str
    device: str = "auto"
    gpus_per_task: float | None = None

    @classmethod
    def parse(cls, address: str | None, device: str = "auto", gpus_per_task: float | None = None) -> ScaleOut | None:
        """None without `--ray` (the single-process path); the options checked otherwise."""
        if address is None:
            if gpus_per_task is not None:
                raise UsageError("--gpus-per-task applies to runs on a Ray cluster; add --ray ADDRESS")
            return None
        if not address.strip():
            raise UsageError("--ray needs an address: auto, local, ray://HOST:PORT or HOST:PORT")
        if gpus_per_task is not None:
            if not 0 < gpus_per_task:
                raise UsageError(f"--gpus-per-task must be a positive number (a fraction shares a GPU), "
                                 f"got {gpus_per_task}")
            if device == "cpu":
                raise UsageError("--gpus-per-task asks for GPUs, but --device is cpu; drop one of them")
        return cls(address.strip(), device, gpus_per_task)
