"""Full updates, added as they are (scale 1): `.diff`/`.diff_b` for linear and conv layers, and
`.w_norm`/`.b_norm` for norm layers' 1-D weight and bias."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import AdapterModule, check_tensors, problem

if TYPE_CHECKING:
    import torch


class FullDiff(AdapterModule):
    algorithm = "full"
    roles = ("diff", "diff_b")
    label = "full (diff)"

    def __init__(self, name: str, diff: torch.Tensor, bias: torch.Tensor | None = None):
        weight_role, bias_role = self.roles
        check_tensors(name, self.label, {weight_role: diff, bias_role: bias})
        super().__init__(name, None, None, bias)
        self.diff = diff
        if bias is not None and (bias.dim() != 1 or diff.dim() == 0 or bias.shape[0] != diff.shape[0]):
            raise problem(name, self.label, f"bias {list(bias.shape)} does not match the weight {list(diff.shape)}")

    @classmethod
    def from_parts(cls, name: str, parts: dict[str, torch.Tensor], alpha, magnitude) -> "FullDiff":
        weight_role, bias_role = cls.roles
        if weight_role not in parts:
            raise problem(name, cls.label, f"has .{bias_role} but no .{weight_role}")
        if magnitude is not None:
            raise problem(name, cls.label, "carries a dora_scale, which only applies to low-rank updates")
        return cls(name, parts[weight_role], parts.get(bias_role))

    def tensors(self) -> dict[str, torch.Tensor]:
        weight_role, bias_role = self.roles
        named = {weight_role: self.diff}
        if self.bias is not None:
            named[bias_role] = self.bias
        return named

    def natural_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def fits(self, shape) -> bool:
        return tuple(shape) == self.natural_shape()

    def unscaled_delta(self, dtype: torch.dtype, device) -> torch.Tensor:
        return self.diff.to(device=device, dtype=dtype)

    @property
    def rank(self) -> None:
        return None

    @property
    def scale(self) -> float:
        return 1.0


class NormDiff(FullDiff):
    """A norm layer's weight and bias deltas (LyCORIS `train_norm`)."""

    roles = ("w_norm", "b_norm")
    label = "full (norm)"
