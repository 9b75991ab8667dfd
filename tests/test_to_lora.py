"""to_lora: the truncated SVD of any module's ΔW, checked against torch.linalg.svd in float64."""

from __future__ import annotations

import math

import pytest
import torch

from loratool.errors import AdapterError, UsageError
from loratool.lora.algorithms import build_module
from loratool.lora.kinds import LayerKind
from loratool.lora.algorithms import LoraModule
from loratool.lora.to_lora import to_lora


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=torch.float64)


def loha(out=24, inp=20, r=3, **extra):
    return build_module("m", {"hada_w1_a": rand(out, r), "hada_w1_b": rand(r, inp, seed=1),
                              "hada_w2_a": rand(out, r, seed=2), "hada_w2_b": rand(r, inp, seed=3),
                              "alpha": torch.tensor(1.5), **extra})


def tail_ratio(matrix: torch.Tensor, rank: int) -> float:
    S = torch.linalg.svdvals(matrix.double())
    return math.sqrt(float(S[rank:].square().sum() / S.square().sum()))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def test_exact_when_rank_reaches_the_true_rank():
    module = loha()  # a Hadamard product of two rank-3 matrices has rank <= 9
    delta = module.delta(torch.float64)
    assert int(torch.linalg.matrix_rank(delta)) == 9
    lora, err = to_lora(module, rank=9, compute_dtype=torch.float64)
    assert err < 1e-12
    assert (lora.rank, lora.alpha, lora.scale, lora.kind) == (9, 9.0, 1.0, LayerKind.LINEAR)
    assert relative(lora.delta(torch.float64), delta) < 1e-6  # LoraModule.delta is float32
    lora32, err32 = to_lora(module, rank=12)
    assert err32 < 1e-6 and lora32.lora_A.dtype == torch.float32


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_error_is_the_optimal_tail_energy(rank):
    module = loha()
    delta = module.delta(torch.float64)
    lora, err = to_lora(module, rank=rank, exact=True, compute_dtype=torch.float64)
    assert lora.rank == rank
    assert err == pytest.approx(tail_ratio(delta, rank), rel=1e-9)
    assert relative(lora.lora_B.double() @ lora.lora_A.double(), delta) == pytest.approx(err, rel=1e-9)


def test_randomized_svd_is_near_optimal_in_float32():
    module = loha(out=96, inp=80, r=4)
    lora, err = to_lora(module, rank=6)
    optimal = tail_ratio(module.delta(torch.float64), 6)
    assert optimal * (1 - 1e-5) <= err <= optimal * 1.01


def test_energy_picks_the_smallest_rank():
    module = loha()
    S = torch.linalg.svdvals(module.delta(torch.float64))
    captured = torch.cumsum(S.square(), 0) / S.square().sum()
    expected = int(torch.nonzero(captured >= 0.9)[0]) + 1
    lora, err = to_lora(module, energy=0.9, compute_dtype=torch.float64)
    assert lora.rank == expected < 9
    assert 1 - err**2 >= 0.9 - 1e-12
    capped, _ = to_lora(module, energy=0.999, max_rank=2, compute_dtype=torch.float64)
    assert capped.rank == 2


def test_conv_becomes_conv_lora():
    module = build_module("c", {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(2, 8, seed=1), "lokr_w2_b": rand(2, 4, seed=2),
                                "lokr_t2": rand(2, 2, 3, 3, seed=3), "alpha": torch.tensor(1.0)})
    assert module.expected_base_shape() == (32, 16, 3, 3)
    delta = module.delta(torch.float64)
    lora, err = to_lora(module, rank=32, compute_dtype=torch.float64)
    assert lora.kind is LayerKind.CONV and lora.lora_A.shape == (32, 16, 3, 3) and lora.lora_B.shape == (32, 32, 1, 1)
    assert err < 1e-12 and relative(lora.delta(torch.float64), delta) < 1e-6
    flat = loha(out=8, inp=18, r=2)  # a LoHa conv stored flat: a conv only once fitted to its base
    flat.fit_to((8, 2, 3, 3))
    lora, _ = to_lora(flat, rank=3)
    assert lora.lora_A.shape == (3, 2, 3, 3) and lora.lora_B.shape == (8, 3, 1, 1)


def test_lora_input_is_re_ranked_from_its_factors():
    module = LoraModule("l", LayerKind.LINEAR, lora_A=rand(6, 20).float(), lora_B=rand(24, 6, seed=5).float(),
                        alpha=3.0)
    delta = module.delta(torch.float64)
    lora, err = to_lora(module, rank=3)
    assert err == pytest.approx(tail_ratio(delta, 3), rel=1e-5)
    embedding = LoraModule("e", LayerKind.EMBEDDING, lora_A=rand(4, 30).float(), lora_B=rand(8, 4, seed=6).float(),
                           alpha=8.0)
    lora, err = to_lora(embedding, rank=4)
    assert lora.kind is LayerKind.EMBEDDING and lora.lora_A.shape == (4, 30) and lora.lora_B.shape == (8, 4)
    assert err < 1e-5 and relative(lora.delta(), embedding.delta()) < 1e-5


def test_dora_folds_in_only_with_a_base():
    module = loha(dora_scale=rand(24, 1).abs() + 1)
    base = rand(24, 20, seed=9)
    with pytest.raises(AdapterError, match="m: a DoRA module's update depends on the base weight"):
        to_lora(module, rank=4)
    lora, err = to_lora(module, rank=20, base=base, compute_dtype=torch.float64)
    assert not lora.is_dora and err < 1e-12
    torch.testing.assert_close(base + lora.delta(torch.float64), module.apply_to(base), rtol=1e-6, atol=1e-6)


def test_bias_is_carried_and_norms_are_refused():
    full = build_module("f", {"diff": rand(6, 5), "diff_b": rand(6, seed=1)})
    lora, err = to_lora(full, rank=5, compute_dtype=torch.float64)
    assert err < 1e-12 and torch.equal(lora.bias, full.bias) and lora.bias_delta(torch.float64).equal(full.bias)
    with pytest.raises(AdapterError, match="n: a norm layer's 1-D update has no low-rank"):
        to_lora(build_module("n", {"w_norm": rand(6)}), rank=1)
    with pytest.raises(UsageError, match="exactly one of --rank and --energy"):
        to_lora(full, rank=2, energy=0.5)
