"""Before any work: does every worker node see the paths this job reads and writes, as the driver does?

The driver writes a probe file holding a random token into OUT's temporary sibling, and notes each
input's size (or a folder's file names); one tiny task pinned to each worker node reads them back. A
node that sees another file there (its own local disk, an unmounted share) is named, in one line,
before a single task of the job is started.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..checkpoint.output import TEMP_MARK, fsync_path
from ..errors import OutputPathError, printable
from .cluster import ClusterError, Session, node_name
from .inputs import hub_snapshot

PROBE_NAME = f"{TEMP_MARK}probe"
#: How long the probe tasks get to be scheduled and answer.
PROBE_TIMEOUT_S = 120.0


def fingerprint(path: str) -> object:
    """What two nodes must agree on for an input: a file's size, a folder's sorted file names and sizes."""
    try:
        if os.path.isdir(path):
            return sorted((e.name, e.stat().st_size if e.is_file() else -1) for e in os.scandir(path))
        return os.stat(path).st_size
    except OSError:
        return None


def look(probe: str | None, token: str | None, inputs: dict[str, object]) -> list[str]:
    """On a worker node: what differs from the driver's view ('OUT' and/or input paths)."""
    wrong = []
    if probe is not None:
        try:
            with open(probe) as f:
                seen = f.read()
        except OSError:
            seen = None
        if seen != token:
            wrong.append("OUT")
    wrong += [path for path, expected in inputs.items() if fingerprint(path) != expected]
    return wrong


def check_visible(session: Session, folder: Path | None, inputs: list[Path]) -> None:
    """Refuse the run unless every worker node sees `folder` (OUT's temporary sibling, written by the
    workers) and each of `inputs` as the driver does."""
    ray = session.ray
    nodes = session.worker_nodes()
    if not nodes:
        raise ClusterError(f"the Ray cluster at {session.address} has no alive node with "
                           f"{session.resources['num_cpus']} CPU(s)"
                           + (f" and {session.gpus_per_task} GPU(s)" if session.gpus_per_task else "")
                           + " free for a task")
    token, probe = None, None
    if folder is not None:
        token, probe = uuid.uuid4().hex, folder / f"{PROBE_NAME}-{uuid.uuid4().hex[:8]}"
        with open(probe, "w") as f:
            f.write(token)
        fsync_path(probe)
    # A Hub snapshot a node lacks is downloaded there (`inputs.on_this_node`), so it is not probed.
    expected = {os.path.abspath(p): fingerprint(str(p)) for p in inputs if hub_snapshot(p) is None}
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        looker = ray.remote(look)
        refs = {looker.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote(str(probe) if probe else None, token, expected):
                node_name(node["NodeID"], node["NodeManagerAddress"]) for node in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        if late:
            raise ClusterError(f"Ray node(s) {', '.join(sorted(refs[r] for r in late))} did not answer the "
                               f"storage probe within {PROBE_TIMEOUT_S:.0f} s")
        wrong: dict[str, list[str]] = {}
        for ref in ready:
            for what in ray.get(ref):
                wrong.setdefault(what, []).append(refs[ref])
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    if "OUT" in wrong:
        raise OutputPathError(
            f"the folder of OUT, {printable(str(folder.parent))}, is not visible from Ray node(s) "
            f"{', '.join(sorted(wrong.pop('OUT')))}: workers write their shards there, so put OUT on storage "
            "that every node mounts at the same path")
    if wrong:
        path, names = sorted(wrong.items())[0]
        raise ClusterError(
            f"the input {printable(path)} is missing or different on Ray node(s) {', '.join(sorted(names))}: "
            "workers read inputs themselves, so put them on storage that every node mounts at the same path")
