"""Every module build_module refuses: one AdapterError line naming the module and the algorithm."""

from __future__ import annotations

import pytest
import torch

from loratool.errors import AdapterError, MismatchError
from loratool.lora.algorithms import KNOWN_ROLES, REFUSED_ROLES, build_module, split_key

t = torch.ones
LOHA = {"hada_w1_a": t(8, 2), "hada_w1_b": t(2, 6), "hada_w2_a": t(8, 2), "hada_w2_b": t(2, 6)}

REFUSALS = [
    ("half-loha", {k: v for k, v in LOHA.items() if k != "hada_w2_b"}, r"m: LoHa module lacks hada_w2_b"),
    ("loha-t1-only", {**LOHA, "hada_t1": t(2, 2, 3, 3)}, r"m: LoHa module lacks hada_t2"),
    ("loha-bad-product", {**LOHA, "hada_w1_b": t(3, 6)}, r"m: LoHa module shapes do not form a product"),
    ("loha-halves-disagree", {**LOHA, "hada_w2_b": t(2, 7)}, r"m: LoHa module halves disagree"),
    ("loha-tucker-bad", {**LOHA, "hada_t1": t(3, 2, 3, 3), "hada_t2": t(2, 2, 3, 3), "hada_w1_a": t(2, 8),
                         "hada_w2_a": t(2, 8)}, r"m: LoHa module shapes do not form a product"),
    ("lokr-no-w2", {"lokr_w1": t(2, 2), "alpha": torch.tensor(1.0)}, r"m: LoKr module lacks lokr_w2"),
    ("lokr-half-w1", {"lokr_w1_a": t(2, 1), "lokr_w2": t(3, 3)}, r"m: LoKr module lacks lokr_w1 \(or both"),
    ("lokr-both-w1", {"lokr_w1": t(2, 2), "lokr_w1_a": t(2, 1), "lokr_w1_b": t(1, 2), "lokr_w2": t(3, 3)},
     r"m: LoKr module has both lokr_w1 and its factors"),
    ("lokr-bad-product", {"lokr_w1": t(2, 2), "lokr_w2_a": t(4, 2), "lokr_w2_b": t(3, 4)},
     r"m: LoKr module shapes do not form a Kronecker product"),
    ("lokr-t2-with-full-w2", {"lokr_w1": t(2, 2), "lokr_w2": t(4, 4), "lokr_t2": t(2, 2, 3, 3)},
     r"m: LoKr module has lokr_t2 but no factored w2"),
    ("lora-half", {"lora_down.weight": t(2, 6), "alpha": torch.tensor(2.0)}, r"m: LoRA module lacks lora_up"),
    ("lora-bad-pair", {"lora_down.weight": t(2, 6), "lora_up.weight": t(8, 3)},
     r"m: LoCon module shapes do not form a product"),
    ("locon-bad-mid", {"lora_down.weight": t(2, 6, 1, 1), "lora_up.weight": t(8, 2, 1, 1),
                       "lora_mid.weight": t(3, 2, 3, 3)}, r"m: LoCon module shapes do not form a product"),
    ("diff-b-only", {"diff_b": t(4)}, r"m: full \(diff\) module has .diff_b but no .diff"),
    ("b-norm-only", {"b_norm": t(4)}, r"m: full \(norm\) module has .b_norm but no .w_norm"),
    ("diff-bad-bias", {"diff": t(4, 3), "diff_b": t(5)}, r"m: full \(diff\) module bias \[5\] does not match"),
    ("diff-with-dora", {"diff": t(4, 3), "dora_scale": t(4, 1)}, r"m: full \(diff\) module carries a dora_scale"),
    ("oft", {"oft_blocks": t(2, 4, 4), "alpha": torch.tensor(1.0)}, r"m: OFT/BOFT .* \(\.oft_blocks\) are not"),
    ("oft-diag", {"oft_diag": t(2, 4, 4)}, r"m: OFT .*\(\.oft_diag\) are not supported"),
    ("oft-r", {"oft_R": t(2, 4, 4)}, r"m: OFT .*\(\.oft_R\)"),
    ("boft", {"oft_blocks": t(2, 2, 4, 4), "rescale": t(8, 1)}, r"m: OFT/BOFT .*\(\.oft_blocks, \.rescale\)"),
    ("glora", {"a1.weight": t(2, 6), "a2.weight": t(8, 2), "b1.weight": t(2, 6), "b2.weight": t(8, 2)},
     r"m: GLoRA modules \(\.a1\.weight, \.a2\.weight, \.b1\.weight, \.b2\.weight\) are not supported"),
    ("ia3", {"weight": t(8), "on_input": torch.tensor(False)}, r"m: IA3 .*\(\.on_input, \.weight\)"),
    ("ia3-weight-only", {"weight": t(8)}, r"m: IA3 .*\(\.weight\)"),
    ("tlora", {"q_layer.weight": t(2, 6), "p_layer.weight": t(8, 2), "lambda_layer": t(1, 2)}, r"m: T-LoRA"),
    ("set-weight", {"set_weight": t(4, 3)}, r"m: set_weight \(replaces the weight"),
    ("lokr-t1", {"lokr_w1": t(2, 2), "lokr_w2": t(2, 2), "lokr_t1": t(2, 2, 3, 3)}, r"m: LoKr with a Tucker w1"),
    ("mixed", {**LOHA, "lokr_w1": t(2, 2), "lokr_w2": t(4, 3)}, r"m: mixes tensors of loha and lokr"),
    ("alpha-only", {"alpha": torch.tensor(4.0)}, r"m: only \.alpha, no weights"),
    ("unknown", {**LOHA, "hada_w3": t(2)}, r"m: unknown adapter tensor\(s\) \.hada_w3"),
    ("alpha-not-scalar", {**LOHA, "alpha": t(2)}, r"m: \.alpha should be a scalar"),
    ("dora-wrong-size", {**LOHA, "dora_scale": t(5, 1)}, r"m: dora_scale \[5, 1\] has neither"),
]


@pytest.mark.parametrize("parts, message", [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_refused(parts, message):
    with pytest.raises(AdapterError, match=message) as info:
        build_module("m", parts)
    assert "\n" not in str(info.value)


def test_every_refused_role_is_named_in_the_table():
    assert set(REFUSED_ROLES) <= set(KNOWN_ROLES)
    for role in REFUSED_ROLES:
        with pytest.raises(AdapterError, match=r"^m: .* not supported"):
            build_module("m", {role: t(2)})


def test_split_key_prefers_the_longest_role():
    assert split_key("lora_unet_a_b.lora_down.weight") == ("lora_unet_a_b", "lora_down.weight")
    assert split_key("lora_unet_a.lokr_w1_a") == ("lora_unet_a", "lokr_w1_a")
    assert split_key("lora_unet_a.lokr_w1") == ("lora_unet_a", "lokr_w1")
    assert split_key("lora_unet_a.diff_b") == ("lora_unet_a", "diff_b")
    assert split_key("lora_te_x.a1.weight") == ("lora_te_x", "a1.weight")
    assert split_key("lora_te_x.weight") == ("lora_te_x", "weight")
    assert split_key("lora_te_x.something") is None
    assert split_key(".alpha") is None


def test_fit_to_refuses_a_base_that_does_not_fit():
    loha = build_module("m", LOHA)
    assert loha.fits((8, 6)) and loha.fits((8, 6, 1, 1)) and loha.fits((8, 2, 3, 1))
    assert not loha.fits((8, 5)) and not loha.fits((7, 6)) and not loha.fits((48,))
    with pytest.raises(MismatchError, match=r"m: a loha update of shape \[8, 6\] does not fit the base weight"):
        loha.fit_to((8, 3))
    flat_conv = build_module("m", {**LOHA, "hada_w1_b": t(2, 18), "hada_w2_b": t(2, 18)})
    assert flat_conv.fits((8, 2, 3, 3)) and flat_conv.fits((8, 18))
    flat_conv.fit_to((8, 2, 3, 3))
    assert flat_conv.delta().shape == (8, 2, 3, 3) and flat_conv.kind.value == "conv"
    dora = build_module("m", {**LOHA, "hada_w1_b": t(2, 18), "hada_w2_b": t(2, 18), "dora_scale": t(1, 6, 1, 1)})
    with pytest.raises(MismatchError, match="m: dora_scale"):
        dora.fit_to((8, 2, 3, 3))
