"""The registry of combination methods (`combine --method`): name -> what the method is.

Torch-free, so the CLI builds its choices and help text from it. `lora/combine.py` does the arithmetic
from these entries: factor methods stack or compress LoRA factors, dense methods prune each ΔWᵢ (by
magnitude or at random, DARE) and then sum or elect signs (TIES). A new method is one entry here (and,
for a new pruning or merging rule, its function in `lora/combine.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MajoritySign = Literal["total", "frequency"]


@dataclass(frozen=True)
class CombineMethod:
    name: str
    kind: Literal["factors", "dense"]
    summary: str
    #: Dense methods: how each ΔWᵢ is pruned before merging.
    prune: Literal["magnitude", "random"] | None = None
    #: Dense methods: TIES' sign election (else a weighted sum of the pruned deltas).
    elect_sign: bool = False


#: The registry behind `--method`: name -> how it combines.
METHODS: dict[str, CombineMethod] = {m.name: m for m in (
    CombineMethod("cat", "factors", "exact Σ wᵢΔWᵢ by stacking factors (rank Σrᵢ)"),
    CombineMethod("linear", "factors", "Σ wᵢΔWᵢ: exact by stacking, or best rank-R with --rank"),
    CombineMethod("svd", "factors", "best rank-R approximation of Σ wᵢΔWᵢ via QR of the stacked factors"),
    CombineMethod("ties", "dense", "TIES: magnitude-prune, elect sign, average agreeing entries; then SVD",
                  prune="magnitude", elect_sign=True),
    CombineMethod("dare_linear", "dense", "DARE: random-prune and rescale, weighted sum; then SVD", prune="random"),
    CombineMethod("dare_ties", "dense", "DARE pruning with TIES sign election; then SVD", prune="random",
                  elect_sign=True),
    CombineMethod("magnitude_prune", "dense", "magnitude-prune each ΔWᵢ, weighted sum; then SVD", prune="magnitude"),
)}
