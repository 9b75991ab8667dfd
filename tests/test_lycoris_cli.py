"""inspect, convert, resize and combine on LyCORIS adapters: kohya files written by LyCORIS' own network
on a tiny diffusers UNet, and PEFT LoHa/LoKr folders saved by PEFT. Oracles: LyCORIS' forward, PEFT's
`from_pretrained` + `merge_and_unload`, and float64 SVDs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lycoris.kohya import LycorisNetworkKohya

from helpers import assert_refused, assert_unbroken, tiny_clip_text, tiny_unet
from loratool.formats.adapters import load_adapter
from loratool.lora.algorithms import split_key
from lycoris_oracle import PRESET, applied_preset, quiet_lycoris, randomize

quiet_lycoris()

#: LyCORIS' preset on the UNet only (a diffusers UNet base has no text encoder to resolve against).
UNET_ONLY = {**PRESET, "text_encoder_target_module": []}
NETWORKS = {
    "loha": dict(network_module="loha"),
    "loha-tucker": dict(network_module="loha", use_tucker=True),
    "lokr": dict(network_module="lokr"),
    "lokr-factor-4": dict(network_module="lokr", factor=4),
    "locon-tucker": dict(network_module="locon", use_tucker=True),
    "lora-train-norm": dict(network_module="lora", train_norm=True),
    "loha-dora": dict(network_module="loha", weight_decompose=True),
    "loha-lokr-mix": dict(network_module="loha", preset={"module_algo_map": {"ResnetBlock2D": {"algo": "lokr"}}}),
}


def unet_model():
    return tiny_unet().double()


def unet_inputs():
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    hidden = torch.randn(2, 3, 8, generator=generator, dtype=torch.float64)
    return sample, torch.tensor([10, 500]), hidden


def unet_output(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The base UNet folder, and per network: its LyCORIS kohya file and LyCORIS' UNet output."""
    folder = tmp_path_factory.mktemp("lycoris-cli")
    unet_model().save_pretrained(folder / "unet", safe_serialization=True)
    files, outputs = {}, {}
    with applied_preset():  # restores LyCORIS' class-level preset afterwards
        for index, (name, kwargs) in enumerate(NETWORKS.items()):
            kwargs = dict(kwargs)
            LycorisNetworkKohya.apply_preset({**UNET_ONLY, **kwargs.pop("preset", {})})
            unet, text = unet_model(), tiny_clip_text().double()
            kwargs = {"lora_dim": 4, "conv_lora_dim": 4, "alpha": 2.0, "conv_alpha": 1.0, **kwargs}
            net = LycorisNetworkKohya(text, unet, multiplier=1.0, **kwargs)
            net.apply_to(text, unet, False, True)
            net.double()
            randomize(net, 20 + index)
            files[name] = folder / f"{name}.safetensors"
            net.save_weights(str(files[name]), torch.float64, {"ss_network_module": "lycoris.kohya"})
            outputs[name] = unet_output(unet)  # LyCORIS' forward: the oracle
            for module in net.unet_loras + net.text_encoder_loras:
                module.restore()
    return folder / "unet", files, outputs


def modules_in(path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        module, role = split_key(key)
        groups.setdefault(module, {})[role] = tensor
    return groups


# -- inspect ---------------------------------------------------------------------------------------------


def test_inspect_tables_fit_80_columns_without_breaking_a_word(run_cli, sd, monkeypatch):
    _, files, _ = sd
    monkeypatch.setenv("COLUMNS", "80")
    for path in files.values():
        report = json.loads(run_cli("inspect", path, "--json").stdout)
        words = {word for g in report["groups"] for word in (g["target"], g["kind"], *g["algorithm"].split())}
        assert_unbroken(run_cli("inspect", path).stdout, ["target", "algorithm", "modules", *sorted(words)])


@pytest.mark.parametrize("network", ["loha-tucker", "lokr-factor-4", "locon-tucker"])
def test_inspect_names_algorithm_rank_factor_tucker_and_parameters(run_cli, sd, network):
    _, files, _ = sd
    report = json.loads(run_cli("inspect", files[network], "--json").stdout)
    groups = modules_in(files[network])
    expected = {}
    for roles in groups.values():
        algorithm = ("loha" if "hada_w1_a" in roles else "lokr" if any(r.startswith("lokr_") for r in roles)
                     else "locon" if roles["lora_down.weight"].dim() == 4 else "lora")
        expected[algorithm] = expected.get(algorithm, 0) + 1
    assert report["algorithms"] == expected and report["modules"] == len(groups)
    # kohya's flattened names group by the base's leaf they end with, in the base's (dotted) terms
    assert {"attn2.to_k", "conv1", "conv_in"} <= set(report["targets"])
    assert all(any(name.endswith("_" + target.replace(".", "_")) for target in report["targets"]) for name in groups)
    assert not any(t.startswith("lora_") for t in report["targets"])
    assert sum(g["modules"] for g in report["groups"]) == len(groups)
    assert sum(g["parameters"] for g in report["groups"]) == sum(
        t.numel() for roles in groups.values() for role, t in roles.items() if role != "alpha")
    assert {"algorithm", "tucker", "factor", "parameters"} <= set(report["groups"][0])
    tucker_file = {name for name, roles in groups.items() if {"hada_t1", "lokr_t2", "lora_mid.weight"} & set(roles)}
    tucker_groups = sum(g["modules"] for g in report["groups"] if g["tucker"])
    assert tucker_groups == len(tucker_file)
    if network.startswith("lokr"):
        factors = {tuple(roles["lokr_w1"].shape) for roles in groups.values()}
        assert {tuple(g["factor"]) for g in report["groups"]} == factors
        assert all(max(f) <= 4 for f in factors)
    else:
        assert all(g["factor"] is None for g in report["groups"])
        assert tucker_file, "the network should have made Tucker modules on its 3x3 convs"
    human = run_cli("inspect", files[network])
    assert human.code == 0 and network.split("-")[0] in human.stdout
    assert ("Tucker" in human.stdout) == bool(tucker_file)


def test_inspect_peft_loha_folder(run_cli, tmp_path):
    folder, _ = peft_folder(tmp_path, LoHaConfig(r=3, alpha=6, target_modules=["conv", "fc"], rank_pattern={"fc": 2}))
    report = json.loads(run_cli("inspect", folder, "--json").stdout)
    assert (report["format"], report["r"], report["lora_alpha"], report["algorithms"]) == ("peft_loha", 3, 6, {"loha": 2})
    groups = {g["target"]: g for g in report["groups"]}
    assert (groups["fc"]["rank"], groups["fc"]["scale"], groups["conv"]["rank"]) == (2, 3.0, 3)
    state = load_file(str(folder / "adapter_model.safetensors"))
    assert groups["fc"]["parameters"] == sum(t.numel() for k, t in state.items() if ".fc." in k)


# -- convert: LyCORIS files -> PEFT LoHa/LoKr folders ------------------------------------------------------


@pytest.mark.parametrize("network", ["loha", "loha-tucker", "lokr"])
def test_kohya_lycoris_to_peft_folder_loads_and_merges_to_lycoris_forward(run_cli, sd, network, tmp_path):
    base, files, outputs = sd
    result = run_cli("convert", files[network], "--to", "peft", "--base", base, "-o", tmp_path / "out", "--json")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    assert report["errors"] is None and report["max_error"] is None  # lossless
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LOKR" if network == "lokr" else "LOHA")
    model = PeftModel.from_pretrained(unet_model(), str(tmp_path / "out"))
    ours = unet_output(model.merge_and_unload())
    expected, plain = outputs[network], unet_output(unet_model())
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_peft_folder_holds_one_algorithm(run_cli, sd, tmp_path):
    base, files, _ = sd
    out = tmp_path / "out"
    mixed = load_adapter(files["loha-lokr-mix"])
    assert {m.algorithm for m in mixed.modules.values()} == {"loha", "lokr"}  # LyCORIS' module_algo_map
    assert_refused(run_cli("convert", files["loha-lokr-mix"], "--to", "peft", "--base", base, "-o", out),
                   out, "a PEFT adapter has one peft_type", "loha on", "lokr on", "--rank R")
    assert_refused(run_cli("convert", files["locon-tucker"], "--to", "peft", "--base", base, "-o", out),
                   out, "one peft_type", "locon (Tucker) on", "lora on", "--rank")
    assert_refused(run_cli("convert", files["loha-dora"], "--to", "peft", "--base", base, "-o", out),
                   out, "PEFT's LoHa/LoKr have no DoRA")
    assert_refused(run_cli("convert", files["loha-dora"], "--to", "peft", "--rank", 4, "--base", base, "-o", out),
                   out, "cannot convert to LoRA", "DoRA loha module's magnitude rescales W + ΔW")
    converted = run_cli("convert", files["loha-lokr-mix"], "--to", "peft", "--rank", 4, "--base", base,
                        "-o", tmp_path / "as-lora", "--json")
    assert converted.code == 0, converted
    assert len(json.loads(converted.stdout)["errors"]) == len(mixed.modules)
    written = load_adapter(tmp_path / "as-lora")
    assert written.source_format == "peft" and len(written.modules) == len(mixed.modules)
    assert {m.algorithm for m in written.modules.values()} <= {"lora", "locon"}
    # LyCORIS splits 4 channels as 1×4 with factor 4, PEFT as 4×1 under every decompose_factor
    assert_refused(run_cli("convert", files["lokr-factor-4"], "--to", "peft", "--base", base, "-o", out), out,
                   "no PEFT decompose_factor reproduces its Kronecker split")
    assert_refused(run_cli("convert", files["loha"], "--to", "diffusers", "--base", base, "-o",
                           tmp_path / "x.safetensors"),
                   tmp_path / "x.safetensors", "a diffusers LoRA file holds plain LoRA only", "loha on", "--rank")


# -- convert --rank: any module as a plain LoRA ------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(6, 12, 3, padding=1)
        self.fc = torch.nn.Linear(24, 20)


def net_weights(model) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone().double() for name in ("conv", "fc")}


def peft_folder(tmp_path, config, seed=3):
    """A PEFT LoHa/LoKr adapter PEFT saved, and its ΔW by PEFT's own merge (float64)."""
    model = get_peft_model(Net().double(), copy.deepcopy(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    folder = tmp_path / f"peft-{config.peft_type.value.lower()}-{seed}"
    model.save_pretrained(str(folder))
    before = net_weights(Net().double())
    merged = PeftModel.from_pretrained(Net().double(), str(folder)).merge_and_unload()
    return folder, {name: w - before[name] for name, w in net_weights(merged).items()}


@pytest.fixture
def net_base(tmp_path):
    path = tmp_path / "net.safetensors"
    save_file({k: v.double().contiguous() for k, v in Net().state_dict().items()}, str(path))
    return path


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    S = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    return math.sqrt(float(S[rank:].square().sum() / S.square().sum()))


def lora_deltas(folder) -> dict[str, torch.Tensor]:
    before = net_weights(Net().double())
    merged = PeftModel.from_pretrained(Net().double(), str(folder)).merge_and_unload()
    return {name: w - before[name] for name, w in net_weights(merged).items()}


@pytest.mark.parametrize("config", [LoHaConfig(r=3, alpha=6, target_modules=["conv", "fc"]),
                                    LoKrConfig(r=2, alpha=3, target_modules=["conv", "fc"], decompose_factor=2)],
                         ids=["loha", "lokr"])
def test_rank_conversion_error_is_the_optimal_truncation_error(run_cli, tmp_path, net_base, config):
    folder, deltas = peft_folder(tmp_path, config)
    rank = 3
    result = run_cli("convert", folder, "--to", "peft", "--rank", rank, "--base", net_base, "-o", tmp_path / "r",
                     "--json")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    assert set(report["errors"]) == {"conv", "fc"}
    for name, delta in deltas.items():
        assert report["errors"][name] == pytest.approx(optimal_error(delta, rank), rel=1e-6)
        assert 0.01 < report["errors"][name] < 1  # a real truncation
    assert report["max_error"] == max(report["errors"].values())
    config_out = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert config_out["peft_type"] == "LORA" and config_out["r"] == rank
    merged = lora_deltas(tmp_path / "r")  # PEFT loads it as a plain LoRA (conv LoRA on the conv)
    for name, delta in deltas.items():
        error = float(torch.linalg.vector_norm(merged[name] - delta) / torch.linalg.vector_norm(delta))
        assert error == pytest.approx(report["errors"][name], rel=1e-6)
    full = run_cli("convert", folder, "--to", "peft", "--rank", 500, "--base", net_base, "-o", tmp_path / "f", "--json")
    assert json.loads(full.stdout)["max_error"] < 1e-12
    for name, delta in lora_deltas(tmp_path / "f").items():
        torch.testing.assert_close(delta, deltas[name], rtol=1e-6, atol=1e-9)
    human = run_cli("convert", folder, "--to", "kohya", "--energy", 0.9, "--base", net_base,
                    "-o", tmp_path / "e.safetensors")
    assert human.code == 0 and "max relative error" in human.stdout and "worst" in human.stdout


def test_rank_conversion_needs_the_base_for_flattened_convs(run_cli, tmp_path):
    folder, _ = peft_folder(tmp_path, LoHaConfig(r=3, alpha=6, target_modules=["conv", "fc"]))
    out = tmp_path / "r"
    assert_refused(run_cli("convert", folder, "--to", "peft", "--rank", 2, "-o", out), out,
                   "2 loha module(s) (conv; fc) store conv kernels flattened", "pass --base")
    assert_refused(run_cli("convert", folder, "--to", "peft", "--max-rank", 2, "-o", out), out, "--max-rank caps")
    assert_refused(run_cli("resize", folder, "--rank", 2, "-o", out), out, "cannot resize to LoRA", "pass --base")


def test_rank_conversion_of_lycoris_files_norms_and_loras(run_cli, sd, tmp_path):
    base, files, outputs = sd
    out = tmp_path / "lora.safetensors"
    result = run_cli("convert", files["loha-tucker"], "--to", "diffusers", "--rank", 64, "--base", base, "-o", out,
                     "--json")
    assert result.code == 0, result
    assert json.loads(result.stdout)["max_error"] < 1e-6  # rank 64 >= every layer's ΔW rank here: exact
    adapter = load_adapter(out)
    assert {m.algorithm for m in adapter.modules.values()} <= {"lora", "locon"}
    merged = tmp_path / "merged"
    assert run_cli("merge", base, out, "-o", merged).code == 0
    from diffusers import UNet2DConditionModel
    ours = unet_output(UNet2DConditionModel.from_pretrained(str(merged)).double())
    expected = outputs["loha-tucker"]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    norm_out = tmp_path / "norm-peft"
    assert_refused(run_cli("convert", files["lora-train-norm"], "--to", "peft", "--rank", 4, "--base", base, "-o",
                           norm_out), norm_out, "norm layer's 1-D full update has no LoRA form", "--to kohya")
    kept = run_cli("convert", files["lora-train-norm"], "--to", "kohya", "--rank", 4, "-o", tmp_path / "k.safetensors",
                   "--base", base, "--json")
    assert kept.code == 0, kept
    assert "norm-layer diffs" in kept.stderr
    roles = {role for module in modules_in(tmp_path / "k.safetensors").values() for role in module}
    assert {"w_norm", "b_norm", "lora_down.weight"} <= roles


# -- PEFT LoHa/LoKr -> kohya ---------------------------------------------------------------------------------


def test_peft_loha_to_kohya_reads_back_the_same_delta(run_cli, tmp_path):
    folder, deltas = peft_folder(tmp_path, LoHaConfig(r=3, alpha=5, target_modules=["conv", "fc"]))
    out = tmp_path / "loha.safetensors"
    assert run_cli("convert", folder, "--to", "kohya", "-o", out).code == 0
    back = load_adapter(out)
    assert set(back.modules) == {"lora_unet_conv", "lora_unet_fc"}
    for name, delta in deltas.items():
        module = back.modules[f"lora_unet_{name}"]
        assert module.algorithm == "loha"
        module.fit_to(delta.shape)
        torch.testing.assert_close(module.delta(torch.float64), delta, rtol=1e-7, atol=1e-12)


def test_peft_lokr_to_kohya_keeps_or_refuses_the_scale(run_cli, tmp_path):
    factored, deltas = peft_folder(tmp_path, LoKrConfig(r=2, alpha=3, target_modules=["fc"], decompose_factor=2))
    out = tmp_path / "lokr.safetensors"
    assert run_cli("convert", factored, "--to", "kohya", "-o", out).code == 0
    module = load_adapter(out).modules["lora_unet_fc"]
    torch.testing.assert_close(module.delta(torch.float64), deltas["fc"], rtol=1e-7, atol=1e-12)
    # r large enough that PEFT keeps both Kronecker halves full: its scale alpha/r, a LyCORIS file's 1
    full, _ = peft_folder(tmp_path, LoKrConfig(r=16, alpha=4, target_modules=["fc"]), seed=4)
    assert {split_key(k)[1] for k in load_file(str(full / "adapter_model.safetensors"))} == {"lokr_w1", "lokr_w2"}
    assert_refused(run_cli("convert", full, "--to", "kohya", "-o", tmp_path / "x.safetensors"),
                   tmp_path / "x.safetensors",
                   "fc: a lokr module with scale 0.25 reads back from a LyCORIS file with scale 1")


# -- resize and combine --------------------------------------------------------------------------------------


def test_resize_turns_lycoris_modules_into_plain_lora(run_cli, tmp_path, net_base):
    folder, deltas = peft_folder(tmp_path, LoHaConfig(r=3, alpha=6, target_modules=["conv", "fc"]))
    result = run_cli("resize", folder, "--rank", 4, "--base", net_base, "-o", tmp_path / "r", "--json")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    errors = {m["name"]: m["relative_error"] for m in report["modules"]}
    for name, delta in deltas.items():
        assert errors[name] == pytest.approx(optimal_error(delta, 4), rel=1e-5)
    assert "loha modules have no LoRA factors" in result.stderr
    merged = lora_deltas(tmp_path / "r")
    for name, delta in deltas.items():
        error = float(torch.linalg.vector_norm(merged[name] - delta) / torch.linalg.vector_norm(delta))
        assert error == pytest.approx(errors[name], rel=1e-5)


def test_combine_takes_lycoris_modules_on_their_delta(run_cli, tmp_path, net_base):
    loha, loha_deltas = peft_folder(tmp_path, LoHaConfig(r=3, alpha=6, target_modules=["conv", "fc"]))
    lokr, lokr_deltas = peft_folder(tmp_path, LoKrConfig(r=2, alpha=3, target_modules=["fc"], decompose_factor=2),
                                    seed=7)
    out = tmp_path / "svd"
    result = run_cli("combine", loha, lokr, "--method", "svd", "--weights", "0.7,-0.4", "--rank", 5, "--base", net_base,
                     "-o", out, "--json")
    assert result.code == 0, result
    errors = {m["name"]: m["relative_error"] for m in json.loads(result.stdout)["modules"]}
    wanted = {"conv": 0.7 * loha_deltas["conv"], "fc": 0.7 * loha_deltas["fc"] - 0.4 * lokr_deltas["fc"]}
    merged = lora_deltas(out)
    for name, target in wanted.items():
        optimum = optimal_error(target, 5)
        assert errors[name] == pytest.approx(optimum, rel=1e-4)
        error = float(torch.linalg.vector_norm(merged[name] - target) / torch.linalg.vector_norm(target))
        assert error == pytest.approx(optimum, rel=1e-4)
    ties = run_cli("combine", loha, lokr, "--method", "ties", "--density", 0.5, "--rank", 5, "--base", net_base,
                   "-o", tmp_path / "ties", "--json")
    assert ties.code == 0, ties
    assert json.loads((tmp_path / "ties" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for method in ("cat", "linear"):
        assert_refused(run_cli("combine", loha, lokr, "--method", method, "--base", net_base, "-o", tmp_path / method),
                       tmp_path / method, f"{method} without --rank stacks LoRA factors", "loha",
                       "--method svd --rank R")
    assert_refused(run_cli("combine", loha, lokr, "--method", "svd", "--base", net_base, "-o", tmp_path / "n"),
                   tmp_path / "n", "give the output --rank R")
    assert_refused(run_cli("combine", loha, lokr, "--method", "svd", "--rank", 2, "-o", tmp_path / "n"), tmp_path / "n",
                   "pass --base")
