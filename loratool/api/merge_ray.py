"""`merge --ray`: one Ray task per output shard, each written straight into OUT's temporary sibling.

The driver plans the merge as it does for a local run and writes everything else (the index, config,
card, companion and pipeline files); it hands each shard's planned tensors and the merge plan to a
task, which opens BASE from the same path on its own node and writes the shard with the local merge's
own writer (`merge._write`, passed in, so the bytes are the local run's). A task writes its shard under
a partial name and renames it into place, fsynced, so a retried task (its worker or node died) never
meets half a file, and partial files a lost attempt may leave are removed before OUT is published.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..checkpoint.output import TEMP_MARK, fsync_path
from ..distributed.options import ScaleOut
from ..distributed.runner import ClusterReport, ProgressCallback, Task

PART_MARK = f"{TEMP_MARK}part-"


class ShardTasks:
    """Collects one task per output shard (`submit`, in `merge._write`'s place); `run` runs them all."""

    def __init__(self, session, base: Path, checkpoints: dict, allow_pickle: bool, write: Callable,
                 progress: ProgressCallback | None):
        self.session, self.base, self.checkpoints, self.allow_pickle = session, base, checkpoints, allow_pickle
        self.write, self.progress = write, progress
        self.tasks: list[Task] = []
        self.report = ClusterReport(session.address, session.device)
        #: Per task, the list its rounding figures go to once it has run (a requantized merge's notes).
        self.figures: list[list | None] = []

    def submit(self, checkpoint, plan, layout: dict, target: Path, device, allow_nonfinite: bool, progress,
               figures: list | None = None) -> int:
        """Takes `merge._write`'s arguments (the device and progress are the cluster's); returns the bytes
        planned, as `_write` returns the bytes written. `figures` gets the shards' rounding figures, in
        file order, when `run` has run."""
        source = next(s for s, c in self.checkpoints.items() if c is checkpoint)
        plan_ref = self.session.ray.put(plan)
        total = 0
        for file_name, items in layout.items():
            nbytes = sum(item.nbytes for item in items)
            shard = target / file_name if file_name else target
            self.tasks.append(Task(write_shard, (str(self.base), self.allow_pickle, source, plan_ref, items, str(shard),
                                                 self.session.device, allow_nonfinite, self.write), nbytes))
            self.figures.append(figures)
            total += nbytes
        return total

    def run(self) -> None:
        from ..distributed.runner import run_tasks

        for target, (_, found) in zip(self.figures, run_tasks(self.session, self.tasks, self.progress, self.report)):
            if target is not None:
                target.extend(found)


def _remove_partials(temp: Path) -> None:
    """Partial shards a lost attempt left (a one-file output's lie beside it, in OUT's parent)."""
    if temp.is_dir():
        found = [Path(folder, name) for folder, _, files in os.walk(temp) for name in files if PART_MARK in name]
    else:
        found = list(temp.parent.glob(f".{temp.name}{PART_MARK}*"))
    for path in found:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def shard_tasks(ray: str | None, gpus_per_task: float | None, device: str, base: Path, checkpoints: dict,
                allow_pickle: bool, temp: Path, progress: ProgressCallback | None,
                write: Callable) -> Iterator[ShardTasks | None]:
    """None without `ray`. Otherwise: join the cluster, check that every worker node sees BASE and OUT's
    temporary sibling `temp` (before any work), yield the collector, and run its tasks on a normal exit."""
    scale = ScaleOut.parse(ray, device, gpus_per_task)
    if scale is None:
        yield None
        return
    from ..distributed.cluster import connect
    from ..distributed.probe import check_visible

    with connect(scale) as session:
        check_visible(session, temp if temp.is_dir() else temp.parent, [base])
        tasks = ShardTasks(session, base, checkpoints, allow_pickle, write, progress)
        try:
            yield tasks
            tasks.run()
        finally:
            _remove_partials(temp)


def write_shard(base: str, allow_pickle: bool, source: str | None, plan, items: list, shard: str, device: str,
                allow_nonfinite: bool, write: Callable) -> tuple[int, list]:
    """One Ray task: write the merged shard `shard` (its planned `items`) of BASE's component `source`;
    returns the bytes written and the rounding figures of the tensors it requantized."""
    import torch

    from ..distributed.inputs import on_this_node
    from ..layouts import open_base

    _, checkpoints = open_base(Path(on_this_node(base)), allow_pickle=allow_pickle)
    final = Path(shard)
    partial = final.with_name(f".{final.name}{PART_MARK}{uuid.uuid4().hex[:8]}")
    try:
        figures: list = []
        written = write(checkpoints[source], plan, {"": items}, partial, torch.device(device), allow_nonfinite, None,
                        figures)
        fsync_path(partial)
        os.replace(partial, final)
        fsync_path(final.parent)
        return written, figures
    finally:
        partial.unlink(missing_ok=True)
        for checkpoint in checkpoints.values():
            checkpoint.close()
