"""Work into balanced groups: the unit of a Ray task."""

from __future__ import annotations

from collections.abc import Sequence

#: Tasks per worker slot: enough that a slow or lost task does not hold the run back by much, few
#: enough that Ray's per-task overhead (tens of milliseconds) stays small against the work.
TASKS_PER_SLOT = 4


def balanced_groups(names: Sequence, costs: Sequence[int], count: int) -> list[list]:
    """`names` cut into at most `count` consecutive runs of about equal total cost.

    Consecutive, because the caller's order is the files' order: a task then reads one stretch of one
    or two files, sequentially, which shared filesystems serve best. Each run aims at an equal share of
    the cost still left, and is closed before an item that would take it further past that share than
    stopping short of it. The same input gives the same groups.
    """
    if not names:
        return []
    count = max(1, min(count, len(names)))
    left = sum(costs)
    groups: list[list] = []
    current: list = []
    load = 0
    for name, cost in zip(names, costs):
        share = left / (count - len(groups))
        if current and len(groups) < count - 1 and load + cost / 2 > share:
            groups.append(current)
            left -= load
            current, load = [], 0
        current.append(name)
        load += cost
    groups.append(current)
    return groups
