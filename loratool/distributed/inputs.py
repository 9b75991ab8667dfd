"""Inputs as a worker node sees them.

An `hf://` input is resolved on the driver into its Hugging Face cache (a path like
`…/models--owner--name/snapshots/<commit>/…`). A worker node that does not see that path downloads the
same commit into its own cache (its HF_HOME or HF_HUB_CACHE, with its HF_ENDPOINT and HF_TOKEN), so
every node reads the revision the driver planned with.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})(?:/(.*))?$")


def hub_snapshot(path: str | os.PathLike) -> tuple[str, str, str] | None:
    """(repo id, commit, path inside the snapshot) for a path in a Hugging Face cache's model snapshot."""
    match = _SNAPSHOT.search(Path(path).as_posix())
    if match is None:
        return None
    owner, name, commit, inner = match.groups()
    return f"{owner}/{name}", commit, inner or ""


def on_this_node(path: str, kind: str = "model") -> str:
    """`path` when this node sees it; a Hub snapshot it lacks is first downloaded into this node's cache
    (`kind`: "model" or "adapter", the files `hf://` fetches for it)."""
    origin = hub_snapshot(path)
    if origin is None or os.path.exists(path):
        return path
    from ..hub.client import ADAPTER_PATTERNS, MODEL_PATTERNS, download

    repo_id, commit, inner = origin
    folder = download(repo_id, commit, MODEL_PATTERNS if kind == "model" else ADAPTER_PATTERNS)
    return str(folder / inner) if inner else str(folder)
