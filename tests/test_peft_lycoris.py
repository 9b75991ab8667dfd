"""PEFT LoHa/LoKr folders: read what PEFT saves, and write folders PEFT loads and merges to our ΔW."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_lokr_factorization

from loratool.errors import AdapterError
from loratool.formats.peft_lycoris import (peft_factorization, peft_type_of, read_peft_lycoris_adapter,
                                           write_peft_lycoris_adapter)
from loratool.lora.algorithms import LoHa, LoKr, build_module
from lycoris_oracle import lycoris_parts, quiet_lycoris, randomize

quiet_lycoris()
TARGETS = ["conv", "conv_b", "pw", "fc", "fc2"]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.pw = torch.nn.Conv2d(32, 32, 1)
        self.fc = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 48)
        self.head = torch.nn.Linear(48, 10)


#: PEFT's LoHa multiplies by `torch.tensor(alpha / r)`, a float32 scalar, so its ΔW carries the scale
#: rounded to float32 (relative 6e-8) even in a float64 model; everything else agrees to float64.
RTOL = 1e-7


def base_model():
    return Net().double()


def weights(model) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in TARGETS}


def peft_deltas(folder) -> dict[str, torch.Tensor]:
    """The oracle: PEFT's own from_pretrained + merge_and_unload, minus the base."""
    base = base_model()
    before = weights(base)
    merged = PeftModel.from_pretrained(base_model(), str(folder)).merge_and_unload()
    return {name: w - before[name] for name, w in weights(merged).items()}


def randomize_peft(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(role in name for role in ("hada_", "lokr_")):
                param.copy_(0.4 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


PEFT_CONFIGS = [
    ("loha-effective-patterns", LoHaConfig(r=4, alpha=8, target_modules=TARGETS, use_effective_conv2d=True,
                                           rank_pattern={"fc": 2}, alpha_pattern={"fc": 3, "pw": 1.5},
                                           modules_to_save=["head"])),
    ("loha-flat", LoHaConfig(r=3, alpha=2, target_modules=TARGETS)),
    ("lokr-decompose-both-effective", LoKrConfig(r=2, alpha=4, target_modules=TARGETS, decompose_both=True,
                                                 use_effective_conv2d=True, rank_pattern={"pw": 16})),
    ("lokr-factor-4", LoKrConfig(r=3, alpha=5, target_modules=TARGETS, decompose_factor=4,
                                 alpha_pattern={"conv": 2})),
]


@pytest.mark.parametrize("config", [c[1] for c in PEFT_CONFIGS], ids=[c[0] for c in PEFT_CONFIGS])
def test_reader_matches_peft_merge(tmp_path, config):
    model = get_peft_model(base_model(), copy.deepcopy(config))
    randomize_peft(model)
    model.save_pretrained(str(tmp_path))
    expected = peft_deltas(tmp_path)
    assert peft_type_of(tmp_path) == config.peft_type.value
    adapter = read_peft_lycoris_adapter(tmp_path)
    assert adapter.source_format == f"peft_{config.peft_type.value.lower()}"
    assert set(adapter.modules) == set(TARGETS)
    for name, module in adapter.modules.items():
        module.fit_to(expected[name].shape)
        torch.testing.assert_close(module.delta(torch.float64), expected[name], rtol=RTOL, atol=1e-12)
    if config.modules_to_save:
        assert set(adapter.full_tensors) == {"head.weight", "head.bias"}


def test_reader_keeps_peft_lokr_scale_when_both_halves_are_full(tmp_path):
    config = LoKrConfig(r=16, alpha=4, target_modules=["pw"])
    model = get_peft_model(base_model(), config)
    randomize_peft(model)
    model.save_pretrained(str(tmp_path))
    module = read_peft_lycoris_adapter(tmp_path).modules["pw"]
    assert module.w1 is not None and module.w2 is not None
    assert (module.rank, module.scale) == (16, 0.25)  # LyCORIS would use 1 for this layout


def lycoris_modules(cls, seed=1, **per_layer) -> dict:
    """Our modules built from real LyCORIS modules on Net's layers: name -> (kwargs for that layer)."""
    net = base_model()
    modules = {}
    for i, (name, kwargs) in enumerate(per_layer.items()):
        kwargs = dict(kwargs)
        dim, alpha = kwargs.pop("dim", 4), kwargs.pop("alpha", 2.0)
        lyco = cls(name, net.get_submodule(name), 1.0, dim, alpha, **kwargs).double()
        randomize(lyco, seed + i)
        ours = build_module(name, lycoris_parts(lyco))
        ours.fit_to(net.get_submodule(name).weight.shape)
        modules[name] = ours
    return modules


# (id, LyCORIS class, layer -> LyCORIS kwargs, layout fields the writer must choose for PEFT)
WRITE_CASES = [
    ("loha-tucker-effective", LohaModule, dict(conv=dict(use_tucker=True), conv_b=dict(use_tucker=True, dim=3),
                                               pw=dict(alpha=1.0), fc=dict()),
     dict(use_effective_conv2d=True)),
    ("loha-mixed-tucker-flattened", LohaModule, dict(conv=dict(use_tucker=True), conv_b=dict(), fc2=dict(dim=2)),
     dict(use_effective_conv2d=False)),
    ("lokr-decompose-both", LokrModule, dict(fc=dict(dim=2, decompose_both=True, alpha=3.0),
                                             conv_b=dict(dim=2, decompose_both=True)),
     dict(decompose_both=True, decompose_factor=-1)),
    ("lokr-factor-4-full-w1", LokrModule, dict(fc2=dict(factor=4), fc=dict(factor=4, alpha=1.0),
                                               conv=dict(factor=4, dim=1)),
     dict(decompose_both=False, decompose_factor=4)),
    ("lokr-both-full-scale-1", LokrModule, dict(pw=dict(dim=8, alpha=3.0), conv=dict(dim=8), fc=dict(dim=2)),
     dict(decompose_both=False)),
    ("lokr-tucker-effective", LokrModule, dict(conv_b=dict(dim=2, use_tucker=True), fc=dict(dim=2)),
     dict(use_effective_conv2d=True)),
    ("lokr-mixed-tucker-flattened", LokrModule, dict(conv_b=dict(dim=2, use_tucker=True), conv=dict(dim=1)),
     dict(use_effective_conv2d=False)),
]


@pytest.mark.parametrize("case", WRITE_CASES, ids=[c[0] for c in WRITE_CASES])
def test_written_folder_loads_in_peft_and_merges_to_our_delta(tmp_path, case):
    _, cls, per_layer, layout = case
    modules = lycoris_modules(cls, **per_layer)
    head = {"head.weight": torch.randn(10, 48, dtype=torch.float64), "head.bias": torch.zeros(10, dtype=torch.float64)}
    write_peft_lycoris_adapter(tmp_path, modules, head, {"modules_to_save": ["head"]})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {key: config[key] for key in layout} == layout
    expected = peft_deltas(tmp_path)
    assert set(expected) >= set(modules)
    for name, module in modules.items():
        torch.testing.assert_close(expected[name], module.delta(torch.float64), rtol=RTOL, atol=1e-12)
    merged = PeftModel.from_pretrained(base_model(), str(tmp_path)).merge_and_unload()
    torch.testing.assert_close(merged.head.weight.detach(), head["head.weight"])
    again = read_peft_lycoris_adapter(tmp_path)
    for name, module in again.modules.items():
        module.fit_to(modules[name].expected_base_shape())
        torch.testing.assert_close(module.delta(torch.float64), modules[name].delta(torch.float64), rtol=RTOL,
                                   atol=1e-12)


def test_writer_layout_choices(tmp_path):
    modules = lycoris_modules(LokrModule, **dict(WRITE_CASES[4][2]))
    assert modules["pw"].scale == 1.0 and modules["conv"].scale == 1.0
    write_peft_lycoris_adapter(tmp_path, modules, {}, {})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and config["target_modules"] == ["conv", "fc", "pw"]
    for name in ("pw", "conv"):  # PEFT's alpha/r must come out as LyCORIS' scale 1 for both-full layouts
        r = config["rank_pattern"].get(name, config["r"])
        assert config["alpha_pattern"].get(name, config["alpha"]) / r == 1.0
    mixed = lycoris_modules(LohaModule, **dict(WRITE_CASES[1][2]))
    write_peft_lycoris_adapter(tmp_path, mixed, {}, {})
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_effective_conv2d"] is False


def test_writer_refusals(tmp_path):
    loha = lycoris_modules(LohaModule, fc=dict())
    lokr = lycoris_modules(LokrModule, fc2=dict(factor=4))
    with pytest.raises(AdapterError, match="holds modules of one algorithm, loha or lokr; got loha, lokr"):
        write_peft_lycoris_adapter(tmp_path, {**loha, **lokr}, {}, {})
    dora = lycoris_modules(LohaModule, fc=dict(weight_decompose=True))
    with pytest.raises(AdapterError, match="fc: PEFT's LoHa/LoKr have no DoRA"):
        write_peft_lycoris_adapter(tmp_path, dora, {}, {})
    clash = {"fc": LoKr("fc", w1=torch.ones(4, 4), w2=torch.ones(16, 16)),
             "fc2": LoKr("fc2", w1=torch.ones(6, 8), w2=torch.ones(8, 8))}
    with pytest.raises(AdapterError, match=r"no PEFT decompose_factor reproduces its Kronecker split"):
        write_peft_lycoris_adapter(tmp_path, clash, {}, {})
    uneven = {"fc": LoHa("fc", torch.ones(8, 2), torch.ones(2, 6), torch.ones(8, 3), torch.ones(3, 6))}
    with pytest.raises(AdapterError, match="fc: LoHa halves of different ranks"):
        write_peft_lycoris_adapter(tmp_path, uneven, {}, {})


def test_peft_factorization_is_peft_s():
    for dimension in range(1, 260):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 32):
            expected = peft_lokr_factorization(dimension, factor)
            assert peft_factorization(dimension, factor) == expected, (dimension, factor)


def test_reader_refusals(tmp_path):
    model = get_peft_model(base_model(), LoHaConfig(r=4, alpha=8, target_modules=["fc"]))
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
    with pytest.raises(AdapterError, match="fc: rank 4 in the weights but r=5 in the config"):
        read_peft_lycoris_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="peft_type 'LORA' is not LOHA or LOKR"):
        read_peft_lycoris_adapter(tmp_path)
    assert peft_type_of(tmp_path) is None
