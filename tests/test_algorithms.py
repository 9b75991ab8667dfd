"""ΔW of every LyCORIS algorithm against LyCORIS' own forward pass (the oracle), in float64."""

from __future__ import annotations

import pytest
import torch

from lycoris.modules.full import FullModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris.modules.norms import NormModule

from loratool.lora.algorithms import FullDiff, LoCon, LoHa, LoKr, NormDiff, build_module
from loratool.lora.kinds import LayerKind
from loratool.lora.algorithms import LoraModule
from lycoris_oracle import check_module, lycoris_parts, quiet_lycoris, randomize

quiet_lycoris()


def linear(i, o, bias=True):
    torch.manual_seed(3)
    return torch.nn.Linear(i, o, bias=bias).double()


def conv(i, o, k=3, bias=True):
    torch.manual_seed(4)
    return torch.nn.Conv2d(i, o, k, padding=k // 2, bias=bias).double()


def make(cls, layer, dim=4, alpha=2.0, seed=1, **kwargs):
    module = cls("lora_test", layer, 1.0, dim, alpha, **kwargs).double()
    module.apply_to()
    randomize(module, seed)
    return module


# (id, lycoris class, layer factory, kwargs, our class, tucker, extra expectations)
CASES = [
    ("loha-linear", LohaModule, lambda: linear(24, 16), dict(), LoHa, False),
    ("loha-linear-rslora", LohaModule, lambda: linear(24, 16), dict(rs_lora=True), LoHa, False),
    ("loha-linear-scalar", LohaModule, lambda: linear(24, 16), dict(use_scalar=True), LoHa, False),
    ("loha-conv3-flat", LohaModule, lambda: conv(6, 8), dict(), LoHa, False),
    ("loha-conv3-tucker", LohaModule, lambda: conv(6, 8), dict(use_tucker=True), LoHa, True),
    ("loha-conv1", LohaModule, lambda: conv(6, 8, k=1), dict(use_tucker=True), LoHa, False),
    ("lokr-linear-both-factored", LokrModule, lambda: linear(64, 64), dict(dim=2, decompose_both=True), LoKr, False),
    ("lokr-linear-full-w1", LokrModule, lambda: linear(64, 48), dict(factor=4), LoKr, False),
    ("lokr-linear-both-full", LokrModule, lambda: linear(16, 12), dict(dim=8, alpha=3.0), LoKr, False),
    ("lokr-conv3-flat", LokrModule, lambda: conv(32, 32), dict(dim=2, factor=4), LoKr, False),
    ("lokr-conv3-tucker", LokrModule, lambda: conv(32, 32), dict(dim=2, factor=4, use_tucker=True), LoKr, True),
    ("lokr-conv3-full", LokrModule, lambda: conv(16, 16), dict(dim=4), LoKr, False),
    ("lokr-conv3-both-factored", LokrModule, lambda: conv(64, 64), dict(dim=2, decompose_both=True), LoKr, False),
    ("locon-linear", LoConModule, lambda: linear(24, 16), dict(), LoraModule, False),
    ("locon-conv3", LoConModule, lambda: conv(6, 8), dict(), LoraModule, False),
    ("locon-conv3-tucker", LoConModule, lambda: conv(6, 8), dict(use_tucker=True), LoCon, True),
    ("dora-locon-out", LoConModule, lambda: linear(24, 16), dict(weight_decompose=True), LoraModule, False),
    ("dora-locon-in", LoConModule, lambda: linear(24, 16), dict(weight_decompose=True, wd_on_out=False), LoCon, False),
    ("dora-locon-conv3-in", LoConModule, lambda: conv(6, 8), dict(weight_decompose=True, wd_on_out=False), LoCon,
     False),
    ("dora-loha-out", LohaModule, lambda: linear(24, 16), dict(weight_decompose=True), LoHa, False),
    ("dora-loha-in", LohaModule, lambda: linear(24, 16), dict(weight_decompose=True, wd_on_out=False), LoHa, False),
    ("dora-loha-conv3-flat-in", LohaModule, lambda: conv(6, 8), dict(weight_decompose=True, wd_on_out=False), LoHa,
     False),
    ("dora-lokr-conv3-tucker-out", LokrModule, lambda: conv(32, 32),
     dict(dim=2, factor=4, use_tucker=True, weight_decompose=True), LoKr, True),
    ("dora-lokr-linear-in", LokrModule, lambda: linear(64, 48),
     dict(factor=4, weight_decompose=True, wd_on_out=False), LoKr, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_delta_matches_lycoris_forward(case):
    _, lycoris_cls, layer_factory, kwargs, our_cls, tucker = case
    layer = layer_factory()
    module = make(lycoris_cls, layer, **kwargs)
    ours = build_module("lora_test", lycoris_parts(module))
    assert type(ours) is our_cls
    assert ours.tucker is tucker
    assert ours.is_dora is bool(kwargs.get("weight_decompose"))
    if ours.is_dora:
        assert ours.dora_axis == ("out" if kwargs.get("wd_on_out", True) else "in")
    if isinstance(ours, LoraModule):
        assert ours.fits(layer.weight.shape)
    else:
        ours.fit_to(layer.weight.shape)
    assert ours.expected_base_shape() == tuple(layer.weight.shape)
    assert ours.kind is (LayerKind.CONV if layer.weight.dim() == 4 else LayerKind.LINEAR)
    check_module(module, ours)


def test_lokr_scale_rules():
    """dim from the factored half, alpha/dim; both halves full -> scale 1 whatever alpha says."""
    both = make(LokrModule, linear(64, 64), dim=2, alpha=5.0, decompose_both=True)
    ours = build_module("m", lycoris_parts(both))
    assert (ours.rank, ours.scale) == (2, 2.5) and ours.w1 is None and ours.w2 is None
    full_w1 = make(LokrModule, linear(64, 48), factor=4, alpha=3.0)
    ours = build_module("m", lycoris_parts(full_w1))
    assert ours.w1 is not None and ours.w2_b is not None and (ours.rank, ours.scale) == (4, 0.75)
    full = make(LokrModule, linear(16, 12), dim=8, alpha=3.0)
    parts = lycoris_parts(full)
    parts["alpha"] = torch.tensor(7.0)  # a file may say anything here; LyCORIS ignores it
    ours = build_module("m", parts)
    assert ours.w1 is not None and ours.w2 is not None and (ours.rank, ours.scale) == (None, 1.0)
    check_module(full, build_module("m", lycoris_parts(full)))


def test_missing_or_zero_alpha_means_scale_one():
    module = make(LohaModule, linear(24, 16), alpha=2.0)
    parts = lycoris_parts(module)
    ours = build_module("m", {k: v for k, v in parts.items() if k != "alpha"})
    assert (ours.alpha, ours.scale) == (4.0, 1.0)
    parts["alpha"] = torch.tensor(0.0)
    assert build_module("m", parts).scale == 1.0
    lora = build_module("m", {"lora_down.weight": torch.ones(3, 5), "lora_up.weight": torch.ones(2, 3)})
    assert isinstance(lora, LoraModule) and lora.scale == 1.0


def test_full_and_norm_diffs_match_lycoris_forward():
    full = make(FullModule, linear(12, 10))
    ours = build_module("lora_test", lycoris_parts(full))
    assert type(ours) is FullDiff and ours.bias is not None and ours.scale == 1.0
    check_module(full, ours)
    full_conv = make(FullModule, conv(4, 6, bias=False))
    ours = build_module("lora_test", lycoris_parts(full_conv))
    assert ours.bias is None and ours.kind is LayerKind.CONV
    check_module(full_conv, ours)
    for layer in (torch.nn.LayerNorm(10).double(), torch.nn.GroupNorm(2, 6).double()):
        norm = NormModule("lora_test", layer, 1.0).double()
        norm.apply_to()
        randomize(norm, 5)
        ours = build_module("lora_test", lycoris_parts(norm))
        assert type(ours) is NormDiff and ours.kind is LayerKind.NORM and ours.bias is not None
        check_module(norm, ours)


def test_lycoris_merge_to_scales_loha_twice():
    """The caveat in docs/lycoris.md: LyCORIS 4.1.3's merge_to applies alpha/r on top of get_weight's
    own alpha/r for LoHa, so its merged weight is not what its forward computes. Ours follows forward."""
    module = make(LohaModule, linear(24, 16), alpha=2.0)
    ours = build_module("lora_test", lycoris_parts(module))
    weight = module.org_module[0].weight.detach().clone()
    module.restore()
    module.merge_to(1.0)
    merged = module.org_module[0].weight.detach()
    assert ours.scale == 0.5
    torch.testing.assert_close(merged - weight, ours.delta(torch.float64) * ours.scale)


def test_parameter_count_and_info():
    module = make(LokrModule, conv(32, 32), dim=2, factor=4, use_tucker=True, weight_decompose=True)
    parts = lycoris_parts(module)
    ours = build_module("lora_test", parts)
    ours.fit_to((32, 32, 3, 3))
    assert ours.parameter_count == sum(t.numel() for role, t in parts.items() if role != "alpha")
    info = ours.info()
    assert info == {"algorithm": "lokr", "kind": "conv", "dora": True, "rank": 2, "alpha": 2.0, "scale": 1.0,
                    "tucker": True, "factor": [4, 4], "parameters": ours.parameter_count, "shape": [32, 32, 3, 3]}
    assert set(ours.named_tensors()) == {f"lora_test.{role}" for role in parts if role != "alpha"}
    lora = build_module("x", {"lora_down.weight": torch.ones(3, 5), "lora_up.weight": torch.ones(2, 3),
                              "alpha": torch.tensor(6.0)})
    assert lora.info()["algorithm"] == "lora" and lora.parameter_count == 21 and lora.scale == 2.0
