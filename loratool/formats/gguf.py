"""GGUF LoRA adapters for llama.cpp: what llama.cpp's loader expects, built from the canonical Adapter.

llama.cpp loads `--lora file.gguf` by pairing `<base tensor>.lora_a` with `.lora_b`, looking the base
tensor up by its GGUF name, and scaling each pair by `adapter.lora.alpha` / rank. Three facts about
the base decide the file, and all three come from its HF folder: the llama.cpp architecture (which
must match the base GGUF's `general.architecture`), the head counts (for the `llama`-arch q/k row
order) and whether `lm_head` exists on its own (a tied model's GGUF has no `output.weight`).

Tensor names come from the `gguf` package's own name map for the architecture, the one llama.cpp's
converter uses. `gguf` is an optional extra (`loratool[gguf]`), imported only inside the functions
that need it, so that `loratool --help` never loads it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, InvalidCheckpointError, MismatchError, UsageError, summarize
from ..gguf_arch import ARCHITECTURES, FILE_TYPES, ArchRule, rope_heads
from ..gguf_file import import_gguf
from ..jsonio import MODEL_CONFIG_RULES, read_json
from ..lora.llamacpp import folded_factors, interleave_rope_rows
from ..lora.module import Adapter
from ..lora.kinds import LayerKind
from ..lora.algorithms import LoraModule
from ..lora.targeting import head_is_tied

if TYPE_CHECKING:
    import torch

GGUF_SUFFIX = ".gguf"
LORA_A, LORA_B = ".lora_a", ".lora_b"


#: `--dtype` name -> GGML tensor type. `auto` keeps each tensor's own float type.
GGUF_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}
#: torch dtype name -> GGML tensor type, for `auto`.
_TORCH_TO_GGML = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class GgufBase:
    """The HF base model as llama.cpp's converter sees it."""

    path: Path
    architecture: str
    rule: ArchRule
    arch_name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    tied_embeddings: bool
    #: base tensor name -> shape, when the folder holds weights (a config-only folder has none).
    shapes: dict[str, tuple[int, ...]] | None
    name_map: Any = field(repr=False)

    def read(self, name: str) -> torch.Tensor:
        from ..checkpoint import open_checkpoint

        with open_checkpoint(self.path) as checkpoint:
            return checkpoint.read(name)


def read_gguf_base(base: str | os.PathLike) -> GgufBase:
    """Read config.json (and the weight headers, when present) of the HF model folder `base`."""
    gguf = import_gguf()
    base = Path(base)
    folder = base if base.is_dir() else base.parent
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UsageError(f"--base for gguf is the base's HF model folder (config.json gives the architecture and "
                         f"head counts); {folder} has no config.json")
    # an object, bounded; layer and head counts in range before anything is sized by them
    config = read_json(config_path, InvalidCheckpointError, rules=MODEL_CONFIG_RULES)
    architecture = (config.get("architectures") or [None])[0]
    rule = ARCHITECTURES.get(architecture)
    if rule is None:
        raise MismatchError(f"{config_path}: loratool knows no llama.cpp GGUF name map for architecture "
                            f"{architecture!r} (supported: {', '.join(ARCHITECTURES)})")
    member = getattr(gguf.MODEL_ARCH, rule.member, None)
    if member is None:
        raise UsageError(f"the installed gguf package has no {rule.member.lower()} architecture; "
                         "upgrade it: pip install -U gguf")
    try:
        n_layers, n_heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidCheckpointError(f"{config_path}: needs num_hidden_layers and num_attention_heads") from e
    shapes = _weight_shapes(base, folder)
    return GgufBase(
        path=base, architecture=architecture, rule=rule, arch_name=gguf.MODEL_ARCH_NAMES[member], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        tied_embeddings=head_is_tied(config, shapes),
        shapes=shapes, name_map=gguf.get_tensor_name_map(member, n_layers),
    )


def _weight_shapes(base: Path, folder: Path) -> dict[str, tuple[int, ...]] | None:
    if base.is_dir() and not any(folder.glob("*.safetensors")):
        return None
    from ..checkpoint import open_checkpoint

    with open_checkpoint(base) as checkpoint:
        return {name: tuple(info.shape) for name, info in checkpoint.items()}


@dataclass
class GgufPair:
    """One lora_a/lora_b pair in the file, and how it is derived from its module."""

    name: str
    module: LoraModule
    permute_heads: int | None
    embedding: bool

    def factors(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_a, lora_b) in torch order: A (r × in) and B (out × r), scale folded, q/k rows
        reordered, and the token embedding's A transposed to (vocab × r) as llama.cpp expects."""
        lora_a, lora_b = folded_factors(self.module, alpha)
        if self.permute_heads:
            lora_b = interleave_rope_rows(lora_b, self.permute_heads)
        if self.embedding:
            lora_a = lora_a.T
        return lora_a.contiguous(), lora_b.contiguous()


def plan_gguf(adapter: Adapter, base: GgufBase) -> tuple[list[GgufPair], list[str]]:
    """Map every module to its GGUF pair, or refuse with every reason at once. Returns the pairs and
    notes (whole tensors dropped because they equal the base)."""
    gguf = import_gguf()
    tensor = gguf.MODEL_TENSOR
    problems: dict[str, list[str]] = {}

    def refuse(reason: str, name: str) -> None:
        problems.setdefault(reason, []).append(name)

    pairs: list[GgufPair] = []
    for name, module in sorted(adapter.modules.items()):
        if not module.plain_lora:
            refuse(f"LyCORIS {module.algorithm} modules (llama.cpp applies only lora_a/lora_b pairs)", name)
            continue
        if module.is_dora:
            refuse("DoRA (llama.cpp applies s·B·A and has no magnitude vector)", name)
        if module.bias is not None:
            refuse("lora_B biases (a llama.cpp adapter holds only lora_a/lora_b)", name)
        if module.kind is LayerKind.CONV:
            refuse("conv layers (llama.cpp has none)", name)
        found = base.name_map.get_type_and_name(name)
        if found is None:
            refuse(f"modules with no tensor in llama.cpp's {base.arch_name} name map", name)
            continue
        kind, gguf_name = found
        if kind == tensor.OUTPUT and base.tied_embeddings:
            refuse("lm_head of a tied-embedding base (its GGUF has no output.weight to apply the LoRA to)", name)
            continue
        heads = rope_heads(base.rule, kind, base.n_heads, base.n_kv_heads, gguf)
        if heads is not None:
            if module.lora_B.shape[0] % (2 * heads):
                refuse(f"q/k rows that do not split into rotary pairs of {heads} heads", name)
                continue
        pairs.append(GgufPair(f"{gguf_name}.weight", module, heads, module.kind is LayerKind.EMBEDDING))
    notes = _check_full_tensors(adapter, base, refuse)
    if problems:
        parts = [f"{reason}: {summarize(sorted(names), 3)}" for reason, names in problems.items()]
        raise AdapterError(f"{adapter.path}: cannot be written as a llama.cpp GGUF adapter: {'; '.join(parts)}")
    return pairs, notes


def _check_full_tensors(adapter: Adapter, base: GgufBase, refuse) -> list[str]:
    """PEFT saves the whole embedding next to an embedding LoRA; a copy equal to the base changes
    nothing and is dropped. Anything else (`modules_to_save`, resized vocabularies) is refused."""
    import torch

    dropped = []
    for name, value in sorted(adapter.full_tensors.items()):
        if base.shapes is not None and tuple(base.shapes.get(name, ())) == tuple(value.shape) \
                and torch.equal(base.read(name), value):
            dropped.append(name)
        else:
            refuse("whole tensors / modules_to_save (a llama.cpp adapter holds only lora_a/lora_b)", name)
    if not dropped:
        return []
    return [f"dropped {summarize(dropped, 3)}: the adapter's copy equals the base's, so it changes nothing"]


@dataclass
class GgufWriteReport:
    types: dict[str, str]
    """GGUF tensor name -> GGML type written."""
    fallbacks: list[str]
    """Tensors written as F16 because q8_0 needs rows of a multiple of 32 values."""


def gguf_type_for(source: torch.Tensor, dtype: str | None) -> str:
    """The GGML type `--dtype` asks for; `None` (auto) keeps the adapter tensor's own float type
    (F32 for any other), also where lora_b was rescaled."""
    return GGUF_DTYPES[dtype] if dtype else _TORCH_TO_GGML.get(str(source.dtype).removeprefix("torch."), "F32")


def write_gguf_adapter(path: Path, pairs: list[GgufPair], alpha: float, base: GgufBase, dtype: str | None,
                       name: str, base_model: str | None) -> GgufWriteReport:
    """Write the pairs and the metadata llama.cpp's loader checks (general.type, general.architecture,
    adapter.type, adapter.lora.alpha) into `path`."""
    gguf = import_gguf()
    writer = gguf.GGUFWriter(str(path), base.arch_name)
    report = GgufWriteReport({}, [])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name)
        if base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_model.rstrip("/").rsplit("/", 1)[-1])
            if _HUB_ID.match(base_model) and not Path(base_model).exists():
                writer.add_base_model_organization(0, base_model.split("/")[0])
                writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
        for pair in pairs:
            sources = (pair.module.lora_A, pair.module.lora_B)
            for suffix, value, source in zip((LORA_A, LORA_B), pair.factors(alpha), sources):
                tensor_name = pair.name + suffix
                wanted = gguf_type_for(source, dtype)
                data, ggml_type = _encode(value, wanted, gguf)
                if ggml_type != wanted:
                    report.fallbacks.append(f"{tensor_name} ({value.shape[-1]} per row)")
                writer.add_tensor(tensor_name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, ggml_type))
                report.types[tensor_name] = ggml_type
        most_common = Counter(report.types.values()).most_common(1)
        if most_common:
            writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[most_common[0][0]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return report


def _encode(tensor: torch.Tensor, ggml_type: str, gguf) -> tuple[Any, str]:
    """The tensor's bytes as `ggml_type`, or as F16 where Q8_0 cannot hold its rows."""
    values = tensor.detach().float().cpu().numpy()
    if ggml_type == "Q8_0" and values.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        ggml_type = "F16"
    return gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, ggml_type)), ggml_type
