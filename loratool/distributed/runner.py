"""Run a job's tasks on the cluster: submit, follow, count per node, and cancel everything on the way out.

Ray retries a task whose worker process or node dies (`MAX_RETRIES`); an exception a task raises is not
retried, since the same input fails the same way. A bad-input error (`LoratoolError`) fails the run with
its own one line; on that, any other failure, Ctrl-C or SIGTERM, the outstanding tasks are cancelled and
awaited before the caller's output cleanup removes the temporary output, so no task writes after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoratoolError
from .cluster import ClusterError, Session, node_name
from .groups import TASKS_PER_SLOT, balanced_groups
from .options import TASK_THREADS, ScaleOut
from .worker import execute

#: Ray's retries of a task whose worker or node died.
MAX_RETRIES = 3
#: How long interrupted tasks get to stop before their workers are killed...
INTERRUPT_WAIT_S = 5.0
#: ...and how long killed ones get to end before the temporary output is removed anyway.
CANCEL_WAIT_S = 30.0
#: The driver wakes this often while it waits (so Ctrl-C is seen at once).
POLL_S = 0.2
#: Called with (work just finished, total work); `describe(text)`, when the callback has it, is told
#: which nodes are in use.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Task:
    """One unit of work: `call(*args)` on a worker; `weight` (bytes, say) drives the progress bar."""

    call: Callable
    args: tuple
    weight: int = 1


@dataclass
class NodeUse:
    node: str
    tasks: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"node": self.node, "tasks": self.tasks, "seconds": round(self.seconds, 3)}


@dataclass
class ClusterReport:
    """Where a run's tasks ran: per node, the tasks finished there and their compute seconds."""

    address: str
    device: str
    tasks: int = 0
    nodes: list[NodeUse] = field(default_factory=list)

    def record(self, node: str, seconds: float) -> None:
        use = next((n for n in self.nodes if n.node == node), None)
        if use is None:
            use = NodeUse(node)
            self.nodes.append(use)
            self.nodes.sort(key=lambda n: n.node)
        use.tasks += 1
        use.seconds += seconds

    def to_json(self) -> dict:
        return {"address": self.address, "device": self.device, "tasks": self.tasks,
                "nodes": [n.to_json() for n in self.nodes]}


def run_tasks(session: Session, tasks: Sequence[Task], progress: ProgressCallback | None = None,
              report: ClusterReport | None = None) -> list[Any]:
    """Every task's result, in the order of `tasks`. `report` (new when not given) gathers per-node use."""
    ray = session.ray
    report = report if report is not None else ClusterReport(session.address, session.device)
    # SPREAD: the tasks' reads and writes are spread over every node's disk and network, not packed.
    remote = ray.remote(execute).options(max_retries=MAX_RETRIES, retry_exceptions=False, scheduling_strategy="SPREAD",
                                         **session.resources)
    total = sum(t.weight for t in tasks)
    results: list[Any] = [None] * len(tasks)
    pending: dict[Any, int] = {}
    try:
        for index, task in enumerate(tasks):
            pending[remote.remote(task.call, TASK_THREADS, *task.args)] = index
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in done:
                index = pending.pop(ref)
                results[index], node_id, ip, seconds = _result(ray, ref)
                report.tasks += 1
                report.record(node_name(node_id, ip), seconds)
                if progress is not None:
                    progress(tasks[index].weight, total)
                    describe = getattr(progress, "describe", None)
                    if describe is not None:
                        describe(f"{report.tasks}/{len(tasks)} tasks on {len(report.nodes)} node(s)")
    except BaseException:
        _cancel(ray, list(pending))
        raise
    return results


def _result(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, LoratoolError):
            raise cause.with_traceback(None) from None
        raise RuntimeError(f"a task on {getattr(e, 'ip', '?')} failed with {type(cause).__name__}: {cause}") from e
    except ray.exceptions.RayError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"the Ray cluster lost a task beyond {MAX_RETRIES} retries ({type(e).__name__}: "
                           f"{first})") from e


def _cancel(ray: Any, refs: list) -> None:
    """Cancel `refs` and wait until each has ended, so that none writes afterwards: first an interrupt
    (a KeyboardInterrupt in the task, which cleans up after itself), then, for any still running after
    INTERRUPT_WAIT_S, killing its worker. (A forced cancel that meets a task just finishing can crash
    Ray's driver-side task manager, ray-project/ray#54798, so it is kept for tasks that do not stop.)"""
    waiting = _cancelled(ray, refs, False, INTERRUPT_WAIT_S)
    _cancelled(ray, waiting, True, CANCEL_WAIT_S)


def _cancelled(ray: Any, refs: list, force: bool, seconds: float) -> list:
    """Cancel `refs` and wait up to `seconds` for them to end; the ones still running."""
    waiting = list(refs)
    try:
        waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0)[1] if waiting else []
    except Exception:  # noqa: BLE001 - the cluster went away: nothing is left to wait for
        return []
    for ref in waiting:
        try:
            ray.cancel(ref, force=force)
        except Exception:  # noqa: BLE001 - a task that finished meanwhile cannot be cancelled
            pass
    deadline = time.monotonic() + seconds
    while waiting and time.monotonic() < deadline:
        try:
            _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=POLL_S)
        except KeyboardInterrupt:  # a second Ctrl-C: the cleanup goes on
            continue
        except Exception:  # noqa: BLE001 - the cluster went away: nothing is left to wait for
            return []
    return waiting


def run_grouped(scale: ScaleOut, call: Callable, items: Sequence, costs: Sequence[int], args: tuple = (),
                progress: ProgressCallback | None = None, inputs: Sequence[Path] = ()) -> tuple[list, ClusterReport]:
    """Join the cluster, check that every worker node sees `inputs`, split `items` into balanced groups
    (by `costs`) and run `call(group, device, *args)` for each, which returns one result per item.
    Returns the results in the order of `items`, whatever the grouping, and where the tasks ran. `args`
    go into the object store once, not once per task."""
    from .cluster import connect
    from .probe import check_visible

    with connect(scale) as session:
        if inputs:
            check_visible(session, None, list(inputs))
        groups = balanced_groups(list(range(len(items))), costs, TASKS_PER_SLOT * session.slots())
        shared = [session.ray.put(arg) for arg in args]
        tasks = [Task(call, ([items[i] for i in group], session.device, *shared), sum(costs[i] for i in group))
                 for group in groups]
        report = ClusterReport(session.address, session.device)
        parts = run_tasks(session, tasks, progress, report)
    results: list[Any] = [None] * len(items)
    for group, part in zip(groups, parts):
        for index, result in zip(group, part):
            results[index] = result
    return results, report
