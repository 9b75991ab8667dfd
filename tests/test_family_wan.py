"""Wan 2.1/2.2 (`layouts/wan.py`): the native table against diffusers' own single-file converter, then
`inspect`, `merge` and `convert` on tiny T2V and I2V transformers in both namings, with LoRAs in every
dialect trainers write for Wan, each merge compared with float64 W + s·B@A computed here, and with
diffusers' own Wan LoRA converters where they work (where they fail, the failure is asserted)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_refused, ok, rel
from loratool.layouts import layout_of
from loratool.layouts.wan import FAMILY, PARAMETERS

LDM = "model.diffusion_model."
WIDTH = 8
#: Tiny configs with Wan's input channels (16: T2V, 36: I2V with a CLIP image embedding).
CONFIGS = {
    "t2v": dict(in_channels=16, image_dim=None, added_kv_proj_dim=None),
    "i2v": dict(in_channels=36, image_dim=10, added_kv_proj_dim=WIDTH),
    "i2v-2.2": dict(in_channels=36, image_dim=None, added_kv_proj_dim=None),  # Wan 2.2 I2V-A14B: no CLIP image
}
#: (native module, diffusers module) pairs the LoRAs below target; the I2V ones only on I2V.
MODULES = [("blocks.0.self_attn.q", "blocks.0.attn1.to_q"), ("blocks.1.self_attn.o", "blocks.1.attn1.to_out.0"),
           ("blocks.0.cross_attn.k", "blocks.0.attn2.to_k"), ("blocks.1.cross_attn.v", "blocks.1.attn2.to_v"),
           ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj"), ("blocks.1.ffn.2", "blocks.1.ffn.net.2"),
           ("head.head", "proj_out"), ("time_projection.1", "condition_embedder.time_proj"),
           ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
           ("time_embedding.2", "condition_embedder.time_embedder.linear_2")]
I2V_MODULES = [("blocks.0.cross_attn.k_img", "blocks.0.attn2.add_k_proj"),
               ("blocks.1.cross_attn.v_img", "blocks.1.attn2.add_v_proj"),
               ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj")]
#: Every dialect: how it names a module (native, diffusers), its down/up roles, and its alpha.
DIALECTS = {
    "musubi": (lambda n, d: "lora_unet_" + n.replace(".", "_"), "lora_down.weight", "lora_up.weight", 4.0),
    "comfyui": (lambda n, d: "diffusion_model." + n, "lora_A.weight", "lora_B.weight", 1.0),
    "comfyui-no-alpha": (lambda n, d: "diffusion_model." + n, "lora_A.weight", "lora_B.weight", None),
    "mochi": (lambda n, d: "diffusion_model." + n, "lora_A", "lora_B", 3.0),
    "diffusers": (lambda n, d: "transformer." + d, "lora_A.weight", "lora_B.weight", None),
    "onetrainer": (lambda n, d: "lora_transformer_" + d.replace(".", "_"), "lora_down.weight", "lora_up.weight", 2.0),
    "lycoris": (lambda n, d: "lycoris_" + d.replace(".", "_"), "lora_down.weight", "lora_up.weight", 1.0),
    "lycoris-loha": (lambda n, d: "lycoris_" + d.replace(".", "_"), None, None, 3.0),
    "lycoris-lokr": (lambda n, d: "lycoris_" + d.replace(".", "_"), None, None, 3.0),
}


def tiny_model(kind: str, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=WIDTH // 2,
                                 out_channels=4, text_dim=6, freq_dim=8, ffn_dim=16, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                 **CONFIGS[kind])


def diffusers_state(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in tiny_model(kind, seed).state_dict().items()}


def _reverse() -> dict[str, str]:
    """diffusers module/parameter (block number as N) -> native, from the table."""
    back = {d: n for n, d in FAMILY.top_level.items()}
    for block in FAMILY.blocks:
        back.update({f"{block.diffusers}.N.{parts[0]}": f"{block.native}.N.{leaf}"
                     for leaf, parts in block.leaves.items()})
    back.update({d: n for n, d in PARAMETERS.items()})
    return back


def to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Wan state dict in native names, through loratool's table (checked against diffusers)."""
    back, native = _reverse(), {}
    for key, tensor in state.items():
        number = re.match(r"blocks\.(\d+)\.", key)
        pattern = re.sub(r"^blocks\.\d+\.", "blocks.N.", key)
        if pattern in back:
            module, param = pattern, ""
        else:
            module, param = pattern.rsplit(".", 1)
        name = back[module] + (f".{param}" if param else "")
        native[name.replace("blocks.N.", f"blocks.{number.group(1)}.") if number else name] = tensor.clone()
    return native


def native_name(module: str) -> str:
    """The native name of a diffusers module, through the table."""
    return next(iter(to_native({f"{module}.weight": torch.zeros(1)}))).removesuffix(".weight")


def make_lora(dialect: str, modules, shapes: dict[str, tuple[int, ...]], rank: int = 2, seed: int = 1):
    """A LoRA in `dialect` on (native, diffusers) module pairs, and diffusers module -> float64 ΔW."""
    name_of, down_role, up_role, alpha = DIALECTS[dialect]
    generator = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for native, diffusers in modules:
        rows, cols = shapes[f"{diffusers}.weight"]
        name = name_of(native, diffusers)
        if down_role is None:  # SimpleTuner's LyCORIS LoHa / LoKr (w2 factored), scale alpha/rank
            def rand(*shape):
                return torch.randn(shape, generator=generator)
            if dialect == "lycoris-loha":
                parts = {"hada_w1_a": rand(rows, rank), "hada_w1_b": rand(rank, cols),
                         "hada_w2_a": rand(rows, rank), "hada_w2_b": rand(rank, cols)}
                delta = (parts["hada_w1_a"].double() @ parts["hada_w1_b"].double()) * (
                    parts["hada_w2_a"].double() @ parts["hada_w2_b"].double())
            else:
                parts = {"lokr_w1": rand(2, 2), "lokr_w2_a": rand(rows // 2, rank), "lokr_w2_b": rand(rank, cols // 2)}
                delta = torch.kron(parts["lokr_w1"].double(), parts["lokr_w2_a"].double() @ parts["lokr_w2_b"].double())
            state.update({f"{name}.{role}": t for role, t in parts.items()})
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
            deltas[diffusers] = delta * alpha / rank
            continue
        down, up = torch.randn(rank, cols, generator=generator), torch.randn(rows, rank, generator=generator)
        state[f"{name}.{down_role}"], state[f"{name}.{up_role}"] = down, up
        scale = 1.0
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
            scale = alpha / rank
        deltas[diffusers] = up.double() @ down.double() * scale
    return state, deltas


def file_products(path) -> dict[str, torch.Tensor]:
    """`products` of a saved file, with diffusers' alphas from its `lora_adapter_metadata` when it has one."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    alphas = {}
    if metadata:
        pattern = metadata.get("transformer.alpha_pattern", {})
        for module in metadata["transformer.target_modules"]:
            alphas[f"transformer.{module}"] = pattern.get(module, metadata["transformer.lora_alpha"])
    return products(load_file(str(path)), alphas)


def products(state: dict[str, torch.Tensor], alphas=None) -> dict[str, torch.Tensor]:
    """Module -> s·B@A in float64 of a LoRA file in any of the roles above (module names as written)."""
    alphas, out = alphas or {}, {}
    for key in state:
        for down_role, up_role in (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight")):
            if key.endswith("." + down_role):
                module = key[: -len(down_role) - 1]
                down, up = state[key].double(), state[f"{module}.{up_role}"].double()
                alpha = state.get(f"{module}.alpha", alphas.get(module))
                out[module] = up @ down * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    return out


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """kind -> (folder, diffusers state, native state); files: native.safetensors (bare),
    comfy.safetensors (under model.diffusion_model.), transformer/diffusion_pytorch_model.safetensors."""
    made = {}
    for kind in CONFIGS:
        folder = tmp_path_factory.mktemp(f"wan-{kind}")
        state = diffusers_state(kind)
        native = to_native(state)
        save_file(native, str(folder / "native.safetensors"))
        save_file({LDM + k: v for k, v in native.items()}, str(folder / "comfy.safetensors"))
        (folder / "transformer").mkdir()
        save_file(state, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        made[kind] = folder, state, native
    return made


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# --- the table against diffusers' single-file converter ----------------------------------------------


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_native_names_are_diffusers_own(kind):
    """Our native file, read by diffusers' `convert_wan_transformer_to_diffusers`, is the diffusers model
    tensor for tensor (as ComfyUI saves it, under model.diffusion_model.)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = diffusers_state(kind)
    native = to_native(state)
    assert "blocks.0.norm3.weight" in native and "blocks.0.modulation" in native and "head.modulation" in native
    assert ("blocks.1.cross_attn.k_img.weight" in native) == (kind == "i2v")
    converted = convert_wan_transformer_to_diffusers({LDM + k: v for k, v in native.items()})
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_flf2v_position_embedding_diffusers_leaves_unnamed():
    """diffusers' single-file converter has no rename for FLF2V's `img_emb.emb_pos` (its own
    scripts/convert_wan_to_diffusers.py maps it to `pos_embed`): the key comes back native. The
    parameter is not a LoRA target, so merges are unaffected; the table records the mapping."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({"img_emb.emb_pos": torch.zeros(1, 4, 10),
                                                      "img_emb.proj.1.weight": torch.zeros(10, 10)})
    assert set(converted) == {"img_emb.emb_pos", "condition_embedder.image_embedder.ff.net.0.proj.weight"}
    assert PARAMETERS["img_emb.emb_pos"] == "condition_embedder.image_embedder.pos_embed"


# --- inspect: family and variant --------------------------------------------------------------------------


#: The published diffusers configs (Wan-AI/*-Diffusers transformer/config.json), size-defining fields.
REAL = {
    "1.3B T2V (2.1)": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16),
    "14B T2V (2.1, or a 2.2 A14B expert)": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                                in_channels=16, out_channels=16),
    "14B I2V (2.1)": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16,
                        image_dim=1280, added_kv_proj_dim=5120),
    "14B FLF2V (2.1)": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16,
                          image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=257 * 2),
    "A14B I2V (2.2 expert)": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36,
                                  out_channels=16),
    "5B TI2V (2.2)": dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
}


@pytest.mark.parametrize("expected", sorted(REAL))
def test_variant_of_the_real_models(expected):
    """Every published Wan transformer, built on the meta device from its config: both namings are
    Wan, with the variant named from shapes."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256,
                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                      rope_max_seq_len=1024, **REAL[expected])
    state = model.state_dict()
    shapes = shapes_of(state)
    native = {k: tuple(v.shape) for k, v in to_native(state).items()}
    for found, layout in ((layout_of(native, None), "wan-native"),
                          (layout_of({LDM + k: v for k, v in native.items()}, None), "wan-native"),
                          (layout_of(shapes, None), "wan-diffusers")):
        assert (found.kind, found.family, found.variant) == (layout, "Wan", expected)


def test_inspect_names_family_and_variant(run_cli, wan):
    for kind, variant in (("t2v", "T2V (2.1)"), ("i2v", "I2V (2.1)"), ("i2v-2.2", "I2V (2.2)")):
        folder = wan[kind][0]
        for path, layout in (("native.safetensors", "wan-native"), ("comfy.safetensors", "wan-native"),
                             ("transformer", "wan-diffusers")):
            report = json.loads(ok(run_cli("inspect", folder / path, "--json")).stdout)
            assert (report["layout"], report["family"]) == (layout, "Wan"), (kind, path)
            assert report["variant"] == f"width-{WIDTH} {variant}", (kind, path)
    folder, state, _ = wan["i2v"]
    for dialect in DIALECTS:
        lora, _ = make_lora(dialect, MODULES[:3], shapes_of(state))
        save_file(lora, str(folder / f"inspect-{dialect}.safetensors"))
        report = json.loads(ok(run_cli("inspect", folder / f"inspect-{dialect}.safetensors", "--json")).stdout)
        assert report["family"] == "Wan", dialect
    # from metadata, as musubi-tuner and sd-scripts write it, when the names say nothing
    lora, _ = make_lora("musubi", MODULES[6:7], shapes_of(state))
    save_file(lora, str(folder / "head-only.safetensors"), metadata={"ss_base_model_version": "wan2.2_t2v_a14b"})
    report = json.loads(ok(run_cli("inspect", folder / "head-only.safetensors", "--json")).stdout)
    assert (report["family"], report["family_from"]) == ("Wan", "metadata")


# --- merges --------------------------------------------------------------------------------------------


def check_merge(run_cli, base_path, lora_path, out, base: dict, deltas: dict, native: bool, prefix: str = ""):
    ok(run_cli("merge", base_path, lora_path, "-o", out))
    merged = load_file(str(out))
    changed = {f"{prefix}{native_name(d) if native else d}.weight": delta for d, delta in deltas.items()}
    assert set(merged) == set(base)
    for key, tensor in base.items():
        expected = tensor.double() + changed[key] if key in changed else tensor.double()
        assert rel(merged[key], expected) < 1e-6, key


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_dialect_merges_into_both_namings(run_cli, wan, tmp_path, dialect):
    folder, state, native = wan["i2v"]
    lora, deltas = make_lora(dialect, MODULES + I2V_MODULES, shapes_of(state))
    save_file(lora, str(tmp_path / "lora.safetensors"))
    check_merge(run_cli, folder / "native.safetensors", tmp_path / "lora.safetensors", tmp_path / "n.safetensors",
                native, deltas, native=True)
    check_merge(run_cli, folder / "transformer" / "diffusion_pytorch_model.safetensors", tmp_path / "lora.safetensors",
                tmp_path / "d.safetensors", state, deltas, native=False)
    if dialect in ("musubi", "diffusers"):
        check_merge(run_cli, folder / "comfy.safetensors", tmp_path / "lora.safetensors", tmp_path / "c.safetensors",
                    {LDM + k: v for k, v in native.items()}, deltas, native=True, prefix=LDM)
        # native names under `diffusion_model.` (a merge's BASE; `inspect` alone reads such a file as a
        # ComfyUI LoRA with stray tensors, as that is the prefix ComfyUI's LoRA saver writes)
        prefixed = {"diffusion_model." + k: v for k, v in native.items()}
        save_file(prefixed, str(tmp_path / "dm.safetensors"))
        check_merge(run_cli, tmp_path / "dm.safetensors", tmp_path / "lora.safetensors",
                    tmp_path / "dm-merged.safetensors", prefixed, deltas, native=True, prefix="diffusion_model.")


def test_full_diffs_and_norms_merge(run_cli, wan, tmp_path):
    """Video trainers' `.diff`/`.diff_b` (full weight and bias deltas, norms included) beside LoRA pairs."""
    folder, state, native = wan["t2v"]
    lora, deltas = make_lora("comfyui", MODULES[:2], shapes_of(state))
    generator = torch.Generator().manual_seed(7)
    diff = torch.randn(WIDTH, WIDTH, generator=generator)
    diff_b = torch.randn(WIDTH, generator=generator)
    norm = torch.randn(WIDTH, generator=generator)
    lora.update({"diffusion_model.blocks.1.cross_attn.q.diff": diff,
                 "diffusion_model.blocks.1.cross_attn.q.diff_b": diff_b,
                 "diffusion_model.blocks.0.norm3.diff": norm})
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    expected = {k: v.double() for k, v in native.items()}
    expected["blocks.0.self_attn.q.weight"] += deltas["blocks.0.attn1.to_q"]
    expected["blocks.1.self_attn.o.weight"] += deltas["blocks.1.attn1.to_out.0"]
    expected["blocks.1.cross_attn.q.weight"] += diff.double()
    expected["blocks.1.cross_attn.q.bias"] += diff_b.double()
    expected["blocks.0.norm3.weight"] += norm.double()
    for key in native:
        assert rel(merged[key], expected[key]) < 1e-6, key
    # the same file into the diffusers naming: norm3 is diffusers' norm2
    ok(run_cli("merge", folder / "transformer", tmp_path / "lora.safetensors", "-o", tmp_path / "d"))
    merged = load_file(str(next((tmp_path / "d").glob("*.safetensors"))))
    assert rel(merged["blocks.0.norm2.weight"], state["blocks.0.norm2.weight"].double() + norm.double()) < 1e-6
    assert rel(merged["blocks.1.attn2.to_q.bias"], state["blocks.1.attn2.to_q.bias"].double() + diff_b.double()) < 1e-6


def test_two_a14b_experts_each_take_their_lora(run_cli, tmp_path):
    """Wan 2.2 A14B: a high-noise and a low-noise expert (same shapes), each merged with its own LoRA: as
    ComfyUI ships them (one file each), and as Wan-AI does (`high_noise_model/`, a sharded folder)."""
    for expert, seed in (("high_noise", 3), ("low_noise", 4)):
        state = diffusers_state("t2v", seed=seed)
        native = to_native(state)
        save_file(native, str(tmp_path / f"{expert}.safetensors"))
        lora, deltas = make_lora("musubi", MODULES, shapes_of(state), seed=seed + 10)
        save_file(lora, str(tmp_path / f"{expert}-lora.safetensors"))
        check_merge(run_cli, tmp_path / f"{expert}.safetensors", tmp_path / f"{expert}-lora.safetensors",
                    tmp_path / f"{expert}-merged.safetensors", native, deltas, native=True)
        folder = tmp_path / f"{expert}_model"
        folder.mkdir()
        shards = {name: {k: v for i, (k, v) in enumerate(sorted(native.items())) if i % 2 == n}
                  for n, name in enumerate(("diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "diffusion_pytorch_model-00002-of-00002.safetensors"))}
        for name, part in shards.items():
            save_file(part, str(folder / name))
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
        (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": WIDTH}))
        report = json.loads(ok(run_cli("inspect", folder, "--json")).stdout)
        assert (report["layout"], report["family"]) == ("wan-native", "Wan")
        ok(run_cli("merge", folder, tmp_path / f"{expert}-lora.safetensors", "-o", tmp_path / f"{expert}-sharded"))
        merged = {}
        for name in shards:
            merged.update(load_file(str(tmp_path / f"{expert}-sharded" / name)))
        single = load_file(str(tmp_path / f"{expert}-merged.safetensors"))
        assert set(merged) == set(single) and all(torch.equal(merged[k], single[k]) for k in single)


# --- diffusers' own LoRA path ------------------------------------------------------------------------------


def test_merges_agree_with_diffusers_wan_lora_converters(run_cli, wan, tmp_path):
    """Where diffusers' Wan LoRA converters accept a file (every block module, with alphas), their
    per-module B@A equals what loratool merges; where they fail, loratool follows float64 W + s·B@A."""
    from diffusers.loaders.lora_conversion_utils import (_convert_musubi_wan_lora_to_diffusers,
                                                         _convert_non_diffusers_wan_lora_to_diffusers)

    folder, state, native = wan["i2v"]
    shapes = shapes_of(state)
    block = [(f"blocks.{i}.{n}", f"blocks.{i}.{d}") for i in range(2) for n, d in (
        ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
        ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
        ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.k_img", "attn2.add_k_proj"),
        ("cross_attn.v_img", "attn2.add_v_proj"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"))]
    for dialect, convert in (("musubi", _convert_musubi_wan_lora_to_diffusers),
                             ("comfyui", _convert_non_diffusers_wan_lora_to_diffusers)):
        lora, deltas = make_lora(dialect, block, shapes, seed=5)
        theirs = products(convert({k: v.clone() for k, v in lora.items()}))
        assert set(theirs) == {f"transformer.{d}" for d in deltas}
        path = tmp_path / f"{dialect}.safetensors"
        save_file(lora, str(path))
        ok(run_cli("merge", folder / "transformer", path, "-o", tmp_path / f"{dialect}-merged"))
        merged = load_file(str(next((tmp_path / f"{dialect}-merged").glob("*.safetensors"))))
        for module in deltas:
            assert rel(merged[f"{module}.weight"] - state[f"{module}.weight"].double(),
                       theirs[f"transformer.{module}"]) < 1e-5, (dialect, module)
        # and diffusers' whole path: the converted LoRA injected with PEFT into the model, fused
        model = tiny_model("i2v")
        model.load_lora_adapter(convert({k: v.clone() for k, v in lora.items()}), prefix="transformer",
                                adapter_name="wan")
        model.fuse_lora()
        model.unload_lora()
        fused = model.state_dict()
        assert set(fused) == set(merged)
        for key, tensor in fused.items():
            assert rel(merged[key], tensor) < 1e-6, (dialect, key)

    # diffusers fails on `head.head.alpha` (never consumed: "state_dict should be empty"), and its musubi
    # converter on any module outside the blocks (it takes a block number from every name)
    for dialect, convert, error in (("comfyui", _convert_non_diffusers_wan_lora_to_diffusers, ValueError),
                                    ("musubi", _convert_musubi_wan_lora_to_diffusers, IndexError)):
        lora, deltas = make_lora(dialect, block + [("head.head", "proj_out")], shapes, seed=6)
        with pytest.raises(error):
            convert({k: v.clone() for k, v in lora.items()})
        save_file(lora, str(tmp_path / "head.safetensors"))
        check_merge(run_cli, folder / "native.safetensors", tmp_path / "head.safetensors",
                    tmp_path / f"head-{dialect}.safetensors", native, deltas, native=True)


# --- convert ----------------------------------------------------------------------------------------------


def test_convert_round_trips_through_both_namings(run_cli, wan, tmp_path):
    """musubi (native names) -> diffusers names against the native file -> kohya names against the
    diffusers file: the same s·B@A for every module, and the kohya result merges as the original; and
    musubi -> PEFT, loaded by PEFT into the diffusers model."""
    folder, state, native = wan["i2v"]
    lora, deltas = make_lora("musubi", MODULES + I2V_MODULES, shapes_of(state))
    save_file(lora, str(tmp_path / "musubi.safetensors"))
    ok(run_cli("convert", tmp_path / "musubi.safetensors", "--to", "diffusers", "--base", folder / "native.safetensors",
               "-o", tmp_path / "diffusers.safetensors"))
    as_diffusers = file_products(tmp_path / "diffusers.safetensors")
    assert set(as_diffusers) == {f"transformer.{d}" for d in deltas}
    ok(run_cli("convert", tmp_path / "diffusers.safetensors", "--to", "kohya", "--base", folder / "transformer",
               "-o", tmp_path / "kohya.safetensors"))
    as_kohya = file_products(tmp_path / "kohya.safetensors")
    assert len(as_kohya) == len(deltas)
    flat = {"lora_unet_" + d.replace(".", "_"): d for d in deltas}
    flat.update({"lora_unet_" + n.replace(".", "_"): d for n, d in MODULES + I2V_MODULES})
    for module, product in as_kohya.items():
        assert rel(product, deltas[flat[module]]) < 1e-6, module
    for module, delta in deltas.items():
        assert rel(as_diffusers[f"transformer.{module}"], delta) < 1e-6, module
    check_merge(run_cli, folder / "native.safetensors", tmp_path / "kohya.safetensors", tmp_path / "k.safetensors",
                native, deltas, native=True)
    # --to peft against the native file: PEFT itself loads it into the diffusers model and merges the same
    from peft import PeftModel

    ok(run_cli("convert", tmp_path / "musubi.safetensors", "--to", "peft", "--base", folder / "native.safetensors",
               "-o", tmp_path / "peft"))
    merged = PeftModel.from_pretrained(tiny_model("i2v"), str(tmp_path / "peft")).merge_and_unload().state_dict()
    for key, tensor in state.items():
        module = key.removesuffix(".weight")
        expected = tensor.double() + deltas[module] if key.endswith(".weight") and module in deltas else tensor.double()
        assert rel(merged[key], expected) < 1e-6, key


def test_convert_to_kohya_against_the_native_file_writes_musubi_names(run_cli, wan, tmp_path):
    """musubi-tuner and ComfyUI name a Wan LoRA in Wan's own names: against the native file, --to kohya
    writes those (a diffusers-named LoRA becomes a musubi one), and the result merges as the original."""
    folder, state, native = wan["i2v"]
    lora, deltas = make_lora("diffusers", MODULES + I2V_MODULES, shapes_of(state))
    save_file(lora, str(tmp_path / "diffusers.safetensors"))
    ok(run_cli("convert", tmp_path / "diffusers.safetensors", "--to", "kohya", "--base", folder / "native.safetensors",
               "-o", tmp_path / "musubi.safetensors"))
    written = file_products(tmp_path / "musubi.safetensors")
    assert set(written) == {"lora_unet_" + n.replace(".", "_") for n, _ in MODULES + I2V_MODULES}
    for native_module, module in MODULES + I2V_MODULES:
        assert rel(written["lora_unet_" + native_module.replace(".", "_")], deltas[module]) < 1e-6, module
    check_merge(run_cli, folder / "native.safetensors", tmp_path / "musubi.safetensors", tmp_path / "m.safetensors",
                native, deltas, native=True)


# --- partial matches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t2v", "i2v-2.2"])
def test_i2v_lora_on_t2v_base_is_refused_then_skipped(run_cli, wan, tmp_path, kind):
    """A Wan 2.1 I2V LoRA (k_img, v_img, img_emb) on a T2V base, or on Wan 2.2's I2V-A14B, which has no
    CLIP image input: refused in one line, then merged without them under --skip-missing."""
    t2v_folder, t2v_state, t2v_native = wan[kind]
    shapes = shapes_of(wan["i2v"][1])
    lora, deltas = make_lora("musubi", MODULES + I2V_MODULES, shapes)
    save_file(lora, str(tmp_path / "i2v-lora.safetensors"))
    for base, out in ((t2v_folder / "native.safetensors", tmp_path / "m.safetensors"),
                      (t2v_folder / "transformer", tmp_path / "m")):
        line = assert_refused(run_cli("merge", base, tmp_path / "i2v-lora.safetensors", "-o", out), out,
                              "3 module(s)", "k_img", "--skip-missing")
        assert "\n" not in line
    report = json.loads(ok(run_cli("merge", t2v_folder / "native.safetensors", tmp_path / "i2v-lora.safetensors",
                                   "-o", tmp_path / "m.safetensors", "--skip-missing", "--json")).stdout)
    assert sorted(s.rsplit(": ", 1)[1] for s in report["skipped"]) == [
        "lora_unet_blocks_0_cross_attn_k_img", "lora_unet_blocks_1_cross_attn_v_img", "lora_unet_img_emb_proj_1"]
    merged = load_file(str(tmp_path / "m.safetensors"))
    changed = {f"{n}.weight": deltas[d] for n, d in MODULES}
    for key, tensor in t2v_native.items():
        assert rel(merged[key], tensor.double() + changed.get(key, 0)) < 1e-6, key


# --- Wan 2.2 A14B as a diffusers pipeline: two experts ----------------------------------------------------


def test_a14b_pipeline_merges_into_the_high_noise_transformer(run_cli, tmp_path):
    """Wan 2.2 A14B's diffusers pipeline holds the high-noise expert in `transformer/` and the low-noise one
    in `transformer_2/`. A LoRA merged into the pipeline goes where diffusers' `load_lora_weights` puts it
    (`transformer`); `transformer_2/` is copied as it is, and takes its own LoRA merged into that folder."""
    pipeline = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    experts = {}
    for seed, name in enumerate(("transformer", "transformer_2")):
        (pipeline / name).mkdir(parents=True)
        experts[name] = diffusers_state("t2v", seed=seed)
        save_file(experts[name], str(pipeline / name / "diffusion_pytorch_model.safetensors"))
        (pipeline / name / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    report = json.loads(ok(run_cli("inspect", pipeline, "--json")).stdout)
    assert (report["layout"], report["family"]) == ("diffusers-pipeline", "Wan")
    assert report["components"]["transformer"] == "wan-diffusers"
    high, high_deltas = make_lora("musubi", MODULES, shapes_of(experts["transformer"]), seed=2)
    low, low_deltas = make_lora("comfyui", MODULES, shapes_of(experts["transformer_2"]), seed=3)
    save_file(high, str(tmp_path / "high.safetensors"))
    save_file(low, str(tmp_path / "low.safetensors"))
    ok(run_cli("merge", pipeline, tmp_path / "high.safetensors", "-o", tmp_path / "merged"))
    ok(run_cli("merge", tmp_path / "merged" / "transformer_2", tmp_path / "low.safetensors", "-o", tmp_path / "low"))
    for name, merged, deltas in (("transformer", tmp_path / "merged" / "transformer", high_deltas),
                                 ("transformer_2", tmp_path / "low", low_deltas)):
        tensors = load_file(str(merged / "diffusion_pytorch_model.safetensors"))
        for key, tensor in experts[name].items():
            module = key.removesuffix(".weight")
            expected = tensor.double() + deltas[module] if key.endswith(".weight") and module in deltas else tensor
            assert rel(tensors[key], expected) < 1e-6, (name, key)
    untouched = load_file(str(tmp_path / "merged" / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(untouched[k], v) for k, v in experts["transformer_2"].items())


def test_where_diffusers_wan_lora_converters_fail(run_cli, wan, tmp_path):
    """The other files diffusers' Wan LoRA converters refuse (docs/formats.md), each merged by loratool
    as float64 W + s·B@A: `.alpha` on a non-block module, Mochi-style roles without `.weight`, a LoRA
    with no block module, and (musubi) a block without all its modules, or without `.alpha`."""
    from diffusers.loaders.lora_conversion_utils import (_convert_musubi_wan_lora_to_diffusers,
                                                         _convert_non_diffusers_wan_lora_to_diffusers)

    folder, state, native = wan["i2v"]
    shapes = shapes_of(state)
    cases = [("comfyui", [MODULES[0], ("time_projection.1", "condition_embedder.time_proj")],
              _convert_non_diffusers_wan_lora_to_diffusers, ValueError),
             ("mochi", MODULES[:2], _convert_non_diffusers_wan_lora_to_diffusers, KeyError),
             ("comfyui-no-alpha", MODULES[6:8], _convert_non_diffusers_wan_lora_to_diffusers, ValueError),
             ("musubi", MODULES[:1], _convert_musubi_wan_lora_to_diffusers, KeyError)]
    for n, (dialect, modules, convert, error) in enumerate(cases):
        lora, deltas = make_lora(dialect, modules, shapes, seed=20 + n)
        with pytest.raises(error):
            convert({k: v.clone() for k, v in lora.items()})
        save_file(lora, str(tmp_path / f"{n}.safetensors"))
        check_merge(run_cli, folder / "native.safetensors", tmp_path / f"{n}.safetensors",
                    tmp_path / f"{n}-merged.safetensors", native, deltas, native=True)
    # musubi without `.alpha` (scale 1): diffusers needs one per module
    lora, deltas = make_lora("musubi", MODULES[:1], shapes, seed=30)
    lora = {k: v for k, v in lora.items() if not k.endswith(".alpha")}
    with pytest.raises(KeyError):
        _convert_musubi_wan_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    save_file(lora, str(tmp_path / "no-alpha.safetensors"))
    ok(run_cli("merge", folder / "native.safetensors", tmp_path / "no-alpha.safetensors", "-o",
               tmp_path / "na.safetensors"))
    key = "blocks.0.self_attn.q.weight"
    merged = load_file(str(tmp_path / "na.safetensors"))[key]
    assert rel(merged, native[key].double() + deltas["blocks.0.attn1.to_q"] / 2.0) < 1e-6


def test_vace_blocks_merge_in_native_names(run_cli, wan, tmp_path):
    """A VACE file is Wan plus `vace_blocks` the table does not map: they keep their native names, so a
    native-named LoRA (musubi or ComfyUI) on them merges, beside the mapped blocks."""
    _, state, native = wan["t2v"]
    generator = torch.Generator().manual_seed(9)
    vace = {**native, "vace_blocks.0.self_attn.q.weight": torch.randn(WIDTH, WIDTH, generator=generator),
            "vace_blocks.0.after_proj.weight": torch.randn(WIDTH, WIDTH, generator=generator)}
    save_file(vace, str(tmp_path / "vace.safetensors"))
    assert json.loads(ok(run_cli("inspect", tmp_path / "vace.safetensors", "--json")).stdout)["family"] == "Wan"
    shapes = {**shapes_of(state), "vace_blocks.0.self_attn.q.weight": (WIDTH, WIDTH),
              "vace_blocks.0.after_proj.weight": (WIDTH, WIDTH)}
    pairs = [MODULES[0], ("vace_blocks.0.self_attn.q", "vace_blocks.0.self_attn.q"),
             ("vace_blocks.0.after_proj", "vace_blocks.0.after_proj")]
    for dialect in ("musubi", "comfyui"):
        lora, deltas = make_lora(dialect, pairs, shapes, seed=12)
        save_file(lora, str(tmp_path / f"{dialect}.safetensors"))
        ok(run_cli("merge", tmp_path / "vace.safetensors", tmp_path / f"{dialect}.safetensors", "-o",
                   tmp_path / f"{dialect}-m.safetensors"))
        merged = load_file(str(tmp_path / f"{dialect}-m.safetensors"))
        expected = {"blocks.0.self_attn.q.weight": deltas["blocks.0.attn1.to_q"],
                    "vace_blocks.0.self_attn.q.weight": deltas["vace_blocks.0.self_attn.q"],
                    "vace_blocks.0.after_proj.weight": deltas["vace_blocks.0.after_proj"]}
        for key, tensor in vace.items():
            assert rel(merged[key], tensor.double() + expected.get(key, 0)) < 1e-6, (dialect, key)
