"""Qwen-Image (and Edit, Layered) and Qwen-Image 2.1 against diffusers: tiny transformers built from
configs here, native single files written through loratool's table and read back by diffusers' own
single-file mapping, LoRAs in every trainer dialect merged into native and diffusers files and compared
with float64 W + s·B@A (and, for one LoRA, with diffusers' own LoRA path injected by PEFT and fused),
2.1's fused `gate_up` in both directions, lossless convert round trips, and `--skip-missing`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dit_family_tools import flat, named_lora as lora_file
from helpers import assert_refused, load_folder, ok, rel

LDM = "model.diffusion_model."
def qwen_model(seed: int = 0, **extra):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
                                       **extra).eval()


def qwen21_model(seed: int = 0):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    return QwenImage21Transformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                         num_attention_heads=2, context_in_dim=12, mlp_ratio=3,
                                         axes_dims_rope=(2, 2, 4)).eval()


def randomized(model) -> dict[str, torch.Tensor]:
    """The state dict with every tensor random (zero-initialised norms would hide a mixed-up name)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_native(state: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the family's native names, through loratool's table: each fused native
    tensor is its diffusers parts concatenated by rows, in the table's order."""
    modules = {k.rsplit(".", 1)[0] for k in state}
    groups = {native: parts for native, parts in family.diffusers_groups(modules).items() if len(parts) > 1}
    fused = {part for parts in groups.values() for part in parts}
    out = {k: v.clone() for k, v in state.items() if k.rsplit(".", 1)[0] not in fused}
    for native, parts in groups.items():
        for param in ("weight", "bias"):
            if f"{parts[0]}.{param}" in state:
                out[f"{native}.{param}"] = torch.cat([state[f"{p}.{param}"] for p in parts])
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (path, diffusers state dict, how to read a merged copy back in diffusers names)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers

    from loratool.layouts import qwen_image

    folder = tmp_path_factory.mktemp("qwen")
    qwen_mapping = SINGLE_FILE_LOADABLE_CLASSES["QwenImageTransformer2DModel"]["checkpoint_mapping_fn"]
    found = {}
    model = qwen_model()
    state = randomized(model)
    model.save_pretrained(folder / "qwen-transformer")
    save_file(to_native(state, qwen_image.FAMILY), str(folder / "qwen.safetensors"))
    save_file({LDM + k: v for k, v in to_native(state, qwen_image.FAMILY).items()}, str(folder / "qwen-comfy.safetensors"))
    found["qwen"] = (folder / "qwen.safetensors", state, lambda p: qwen_mapping(load_file(str(p))))
    found["qwen-comfy"] = (folder / "qwen-comfy.safetensors", state,
                           lambda p: {k.removeprefix(LDM): v for k, v in load_file(str(p)).items()})
    found["qwen-diffusers"] = (folder / "qwen-transformer", state, load_folder)
    model21 = qwen21_model()
    state21 = randomized(model21)
    model21.save_pretrained(folder / "qwen21-transformer")
    native21 = to_native(state21, qwen_image.FAMILY_21)
    save_file(native21, str(folder / "qwen21.safetensors"))
    save_file({LDM + k: v for k, v in native21.items()}, str(folder / "qwen21-comfy.safetensors"))
    back21 = lambda p: convert_qwen_image21_transformer_checkpoint_to_diffusers(load_file(str(p)))  # noqa: E731
    found["qwen21"] = (folder / "qwen21.safetensors", state21, back21)
    found["qwen21-comfy"] = (folder / "qwen21-comfy.safetensors", state21, back21)
    found["qwen21-diffusers"] = (folder / "qwen21-transformer", state21, load_folder)
    return found


def test_native_files_are_what_diffusers_reads(bases):
    """Qwen-Image's native names ARE diffusers' (its single-file mapping is the identity); 2.1's native
    file fuses gate_up, and diffusers' converter splits it back, tensor for tensor, bare or as ComfyUI
    saves it."""
    for name in ("qwen", "qwen-comfy", "qwen21", "qwen21-comfy"):
        path, state, back = bases[name]
        converted = back(path)
        assert converted.keys() == state.keys(), name
        assert all(torch.equal(converted[k], state[k]) for k in state), name
    native21 = load_file(str(bases["qwen21"][0]))
    assert "transformer_blocks.0.img_mlp.gate_up.weight" in native21
    assert not any("gate_layer" in k for k in native21)


@pytest.mark.parametrize("name,layout,variant", [
    ("qwen", "qwen-image", None), ("qwen-comfy", "qwen-image", None), ("qwen-diffusers", "qwen-image", None),
    ("qwen21", "qwen-image-2.1-native", "2.1"), ("qwen21-comfy", "qwen-image-2.1-native", "2.1"),
    ("qwen21-diffusers", "qwen-image-2.1-diffusers", "2.1")])
def test_inspect_names_family_and_variant(run_cli, bases, name, layout, variant):
    report = json.loads(ok(run_cli("inspect", bases[name][0], "--json")).stdout)
    assert (report["layout"], report["family"], report["variant"]) == (layout, "Qwen-Image", variant)


def test_layered_variant_from_shapes():
    from pathlib import Path

    from loratool.layouts import layout_of

    state = qwen_model(use_additional_t_cond=True).state_dict()
    layout = layout_of({k: tuple(v.shape) for k, v in state.items()}, Path("layered"))
    assert (layout.family, layout.variant) == ("Qwen-Image", "Layered")


# --- LoRAs in every dialect -----------------------------------------------------------------------------

#: Qwen-Image modules covered (native = diffusers names): every kind of linear, block and top level.
QWEN_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.0.attn.to_out.0",
                "transformer_blocks.1.attn.to_add_out", "transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1",
                "transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.1.txt_mlp.net.2", "img_in", "txt_in",
                "norm_out.linear", "proj_out", "time_text_embed.timestep_embedder.linear_1")
#: Qwen-Image 2.1, in native names (gate_up fused) and in diffusers names (gate_layer, proj).
QWEN21_NATIVE = ("transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_out.0", "transformer_blocks.0.img_mlp.gate_up",
                 "transformer_blocks.1.img_mlp.out", "modulation.1", "txt_in.in_layer", "norm_out.linear", "proj_out")
QWEN21_DIFFUSERS = ("transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_out.0",
                    "transformer_blocks.0.img_mlp.gate_layer", "transformer_blocks.1.img_mlp.proj",
                    "transformer_blocks.1.img_mlp.out", "modulation.1", "txt_in.out_layer", "proj_out")
DIALECTS = ("musubi", "comfyui", "comfyui-no-alpha", "diffusers", "onetrainer", "mochi", "lycoris-loha",
            "lycoris-lokr")


def native_shapes(state: dict[str, torch.Tensor], family) -> dict[str, tuple[int, int]]:
    both = {**state, **to_native(state, family)}
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in both.items() if k.endswith(".weight") and v.dim() == 2}


def expected_state(state, deltas, family) -> dict[str, torch.Tensor]:
    """W + ΔW in float64, in diffusers names (a fused native ΔW split by rows into its parts)."""
    expected = {k: v.double().clone() for k, v in state.items()}
    for module, delta in deltas.items():
        parts = family.native_to_diffusers(module) or (module,)
        start = 0
        for part in parts:
            rows = expected[f"{part}.weight"].shape[0]
            expected[f"{part}.weight"] += delta[start:start + rows]
            start += rows
        assert start == delta.shape[0], module
    return expected


def check_merge(run_cli, tmp_path, bases, base_name, lora, deltas, family, *extra):
    path, state, back = bases[base_name]
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / ("merged" if path.is_dir() else "merged.safetensors")
    ok(run_cli("merge", path, tmp_path / "lora.safetensors", "-o", out, *extra))
    merged, expected = back(out), expected_state(state, deltas, family)
    assert merged.keys() == state.keys()
    for key in state:
        assert rel(merged[key], expected[key]) < 1e-6, (base_name, key)
    assert sum(not torch.equal(merged[k], state[k]) for k in state) >= len(deltas)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_qwen_image_loras_merge_into_every_base(run_cli, tmp_path, bases, dialect):
    from loratool.layouts import qwen_image

    shapes = native_shapes(bases["qwen"][1], qwen_image.FAMILY)
    lora, deltas = lora_file(dialect, QWEN_MODULES, shapes)
    for base in ("qwen", "qwen-comfy", "qwen-diffusers"):
        check_merge(run_cli, tmp_path / base, bases, base, lora, deltas, qwen_image.FAMILY)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    assert json.loads(ok(run_cli("inspect", tmp_path / "lora.safetensors", "--json")).stdout)["family"] == "Qwen-Image"


@pytest.mark.parametrize("dialect,names", [(d, n) for d in DIALECTS for n in ("native", "diffusers")
                                            if n == "diffusers" or not d.startswith("lycoris")])  # SimpleTuner: diffusers names
def test_qwen21_gate_up_both_ways(run_cli, tmp_path, bases, dialect, names):
    """A LoRA on 2.1's fused gate_up merges into a diffusers file's gate_layer and proj (B split by
    rows, gate first), and a LoRA on separate gate_layer/proj merges into the rows of the native
    gate_up; in every dialect, into every 2.1 base."""
    from loratool.layouts import qwen_image

    family = qwen_image.FAMILY_21
    modules = QWEN21_NATIVE if names == "native" else QWEN21_DIFFUSERS
    lora, deltas = lora_file(dialect, modules, native_shapes(bases["qwen21"][1], family))
    for base in ("qwen21", "qwen21-comfy", "qwen21-diffusers"):
        check_merge(run_cli, tmp_path / base, bases, base, lora, deltas, family)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    assert json.loads(ok(run_cli("inspect", tmp_path / "lora.safetensors", "--json")).stdout)["family"] == "Qwen-Image"


def test_merge_matches_diffusers_own_lora_path(tmp_path, run_cli, bases):
    """A musubi Qwen-Image LoRA through diffusers' `_convert_non_diffusers_qwen_lora_to_diffusers`,
    injected by PEFT and fused, gives what loratool merges into the native file."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from loratool.layouts import qwen_image

    path, state, _ = bases["qwen"]
    lora, deltas = lora_file("musubi", QWEN_MODULES, native_shapes(state, qwen_image.FAMILY), seed=3)
    lora = {k: v.float() for k, v in lora.items()}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", path, tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    ours = load_file(str(tmp_path / "m.safetensors"))
    converted = _convert_non_diffusers_qwen_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    model = qwen_model()
    model.load_state_dict(state)
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="musubi")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    theirs = model.state_dict()
    for module in QWEN_MODULES:
        key = f"{module}.weight"
        assert rel(ours[key], theirs[key]) < 1e-5, key
        assert not torch.equal(ours[key], state[key])


def test_diffusers_kohya_converter_mangles_qwen21_names(run_cli, tmp_path, bases):
    """diffusers' Qwen kohya converter re-dots flattened names from a fixed list of n-grams: 2.1's
    `img_mlp_gate_layer` becomes `img_mlp.gate.layer`, and top-level `modulation_1`/`txt_in_in_layer` are
    cut as if they began with `transformer_blocks_`. loratool resolves them against the base."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from loratool.layouts import qwen_image

    state = bases["qwen21"][1]
    lora, deltas = lora_file("musubi", QWEN21_DIFFUSERS, native_shapes(state, qwen_image.FAMILY_21))
    with pytest.raises(ValueError, match="should be empty"):  # the top-level names leave garbage behind
        _convert_non_diffusers_qwen_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    blocks = {k: v.clone() for k, v in lora.items() if k.startswith("lora_unet_transformer_blocks_")}
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(blocks)
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}
    assert "transformer_blocks.0.img_mlp.gate.layer" in modules
    assert "transformer_blocks.0.img_mlp.gate_layer" not in modules
    check_merge(run_cli, tmp_path, bases, "qwen21-diffusers", lora, deltas, qwen_image.FAMILY_21)


def test_convert_round_trips(run_cli, tmp_path, bases):
    """musubi (native names) -> diffusers names against the native file -> kohya against the diffusers
    file: the same ΔW per module; 2.1's gate_up splits into gate_layer and proj on the way."""
    from loratool.layouts import qwen_image

    for kind, family, modules in (("qwen", qwen_image.FAMILY, QWEN_MODULES),
                                  ("qwen21", qwen_image.FAMILY_21, QWEN21_NATIVE)):
        folder = tmp_path / kind
        folder.mkdir()
        lora, deltas = lora_file("musubi", modules, native_shapes(bases[kind][1], family), seed=9)
        save_file(lora, str(folder / "lora.safetensors"))
        ok(run_cli("convert", folder / "lora.safetensors", "--to", "diffusers", "--base", bases[kind][0],
                   "-o", folder / "diffusers.safetensors"))
        ok(run_cli("convert", folder / "diffusers.safetensors", "--to", "kohya", "--base",
                   bases[f"{kind}-diffusers"][0], "-o", folder / "kohya.safetensors"))
        as_diffusers, as_kohya = load_file(str(folder / "diffusers.safetensors")), load_file(str(folder / "kohya.safetensors"))
        with safe_open(str(folder / "diffusers.safetensors"), "pt") as handle:
            config = json.loads(handle.metadata()["lora_adapter_metadata"])  # one alpha and rank: no patterns
        assert not config["transformer.alpha_pattern"] and not config["transformer.rank_pattern"]
        expected = {}
        for module, delta in deltas.items():
            parts = family.native_to_diffusers(module) or (module,)
            start = 0
            for part in parts:
                rows = bases[kind][1][f"{part}.weight"].shape[0]
                expected[part] = delta[start:start + rows]
                start += rows
        assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in as_diffusers} == set(expected)
        for part, delta in expected.items():
            a, b = as_diffusers[f"transformer.{part}.lora_A.weight"], as_diffusers[f"transformer.{part}.lora_B.weight"]
            scale = config["transformer.lora_alpha"] / config["transformer.r"]
            assert rel(b.double() @ a.double() * scale, delta) < 1e-6, part
            name = "lora_unet_" + flat(part)
            down, up = as_kohya[f"{name}.lora_down.weight"], as_kohya[f"{name}.lora_up.weight"]
            k_scale = float(as_kohya[f"{name}.alpha"]) / down.shape[0] if f"{name}.alpha" in as_kohya else 1.0
            assert rel(up.double() @ down.double() * k_scale, delta) < 1e-6, part


def test_modules_the_base_lacks_are_refused_then_skipped(run_cli, tmp_path, bases):
    """A Qwen-Image LoRA (txt_mlp, img_mod) on a 2.1 base: one line naming the count; --skip-missing
    merges the modules 2.1 has."""
    from loratool.layouts import qwen_image

    shapes = {**native_shapes(bases["qwen21"][1], qwen_image.FAMILY_21),
              "transformer_blocks.0.txt_mlp.net.2": (16, 64), "transformer_blocks.0.img_mod.1": (96, 16)}
    present = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.gate_up")
    lora, deltas = lora_file("musubi", (*present, "transformer_blocks.0.txt_mlp.net.2", "transformer_blocks.0.img_mod.1"),
                             shapes)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli("merge", bases["qwen21"][0], tmp_path / "lora.safetensors", "-o", out), out,
                   "2 module(s)", "txt_mlp", "--skip-missing")
    kept = {m: deltas[m] for m in present}
    check_merge(run_cli, tmp_path / "skip", bases, "qwen21", lora, kept, qwen_image.FAMILY_21, "--skip-missing")


@pytest.mark.parametrize("key,value", [("ss_base_model_version", "qwen_image_edit"),
                                       ("modelspec.architecture", "Qwen-Image")])
def test_lora_family_from_metadata(run_cli, tmp_path, key, value):
    lora = {"lora_unet_some_module.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_some_module.lora_up.weight": torch.zeros(4, 2)}
    save_file(lora, str(tmp_path / "lora.safetensors"), metadata={key: value})
    report = json.loads(ok(run_cli("inspect", tmp_path / "lora.safetensors", "--json")).stdout)
    assert (report["family"], report["family_from"]) == ("Qwen-Image", "metadata")


def test_pipeline_folder(run_cli, tmp_path, bases):
    """A diffusers Qwen-Image pipeline folder: inspect names the family; a musubi LoRA merges into its
    transformer/ and the folder keeps its layout."""
    import shutil

    from loratool.layouts import qwen_image

    pipeline = tmp_path / "pipeline"
    shutil.copytree(bases["qwen-diffusers"][0], pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImageEditPipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"]}))
    report = json.loads(ok(run_cli("inspect", pipeline, "--json")).stdout)
    assert (report["layout"], report["family"]) == ("diffusers-pipeline", "Qwen-Image")
    state = bases["qwen"][1]
    lora, deltas = lora_file("musubi", QWEN_MODULES, native_shapes(state, qwen_image.FAMILY))
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", pipeline, tmp_path / "lora.safetensors", "-o", tmp_path / "merged"))
    merged, expected = load_folder(tmp_path / "merged" / "transformer"), expected_state(state, deltas, qwen_image.FAMILY)
    assert all(rel(merged[k], expected[k]) < 1e-6 for k in state)
    assert (tmp_path / "merged" / "model_index.json").read_text() == (pipeline / "model_index.json").read_text()
