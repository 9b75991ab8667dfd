"""Work into balanced groups: the unit of a Ray task."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

#: Tasks per worker slot: enough that a slow or lost task does not hold the run back by much, few
#: enough that Ray's per-task overhead (tens of milliseconds) stays small against the work.
TASKS_PER_SLOT = 4


def balanced_groups(names: Sequence[str], costs: Sequence[int], count: int) -> list[list[str]]:
    """`names` into at most `count` groups of about equal total cost (largest first onto the lightest
    group), each group in the order `names` gives. The same input gives the same groups."""
    count = max(1, min(count, len(names)))
    heap = [(0, index) for index in range(count)]
    members: list[list[int]] = [[] for _ in range(count)]
    for position in sorted(range(len(names)), key=lambda i: (-costs[i], i)):
        load, index = heapq.heappop(heap)
        members[index].append(position)
        heapq.heappush(heap, (load + costs[position], index))
    return [[names[i] for i in sorted(group)] for group in members if group]
