"""Pickle-based checkpoints (`torch.save` files). Refused by default; loaded only with `weights_only=True`."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PickleRefusedError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt"})


def refuse_pickle(path: Path) -> PickleRefusedError:
    return PickleRefusedError(
        f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; convert it to safetensors, "
        "or pass --allow-pickle to load it with torch.load(weights_only=True)"
    )


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with the restricted unpickler; anything but plain tensors is refused."""
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PickleRefusedError(f"{path}: refused by torch.load(weights_only=True): {first_line}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise PickleRefusedError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PickleRefusedError(f"{path}: entries that are not tensors: {', '.join(bad[:5])}")
    return obj
