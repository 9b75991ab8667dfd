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


@dataclass(frozen=True)
class ArchRule:
    """How llama.cpp's `convert_hf_to_gguf.py` converts one transformers architecture."""

    member: str
    """The `gguf.MODEL_ARCH` member it converts to (its name map and `general.architecture`)."""
    permute_qk: bool
    """Whether it reorders q/k rows per head (`LlamaModel.permute`), which lora_b must then follow."""


#: transformers architecture -> llama.cpp's conversion of it. Only architectures whose LoRA path has
#: been checked end to end are listed; others are refused rather than guessed.
ARCHITECTURES: dict[str, ArchRule] = {
    "LlamaForCausalLM": ArchRule("LLAMA", True),
    "MistralForCausalLM": ArchRule("LLAMA", True),
    "Qwen2ForCausalLM": ArchRule("QWEN2", False),
    "Qwen3ForCausalLM": ArchRule("QWEN3", False),
}

#: `--dtype` name -> GGML tensor type. `auto` keeps each tensor's own float type.
GGUF_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}
#: torch dtype name -> GGML tensor type, for `auto`.
_TORCH_TO_GGML = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: GGML type -> the `LlamaFileType` recorded as `general.file_type`.
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def import_gguf():
    """The `gguf` package, or a one-line error naming the extra that provides it."""
    try:
        import gguf
    except ImportError as e:
        raise UsageError("GGUF needs the gguf package: pip install 'loratool[gguf]'") from e
    return gguf


def rope_heads(rule: ArchRule, kind: Any, n_heads: int, n_kv_heads: int, gguf) -> int | None:
    """The head count whose rotary pairs llama.cpp's converter interleaved in a tensor of `kind` (a
    `gguf.MODEL_TENSOR`): q uses the attention heads, k the KV heads; None where rows keep HF order."""
    if not rule.permute_qk or kind not in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
        return None
    return n_heads if kind == gguf.MODEL_TENSOR.ATTN_Q else n_kv_heads


def rule_for_gguf_arch(arch_name: str, gguf) -> tuple[str, ArchRule] | None:
    """(transformers architecture, rule) converted to GGUF architecture `arch_name` (`llama`: the first
    listed, Llama), or None for an architecture loratool has no name map for."""
    for architecture, rule in ARCHITECTURES.items():
        member = getattr(gguf.MODEL_ARCH, rule.member, None)
        if member is not None and gguf.MODEL_ARCH_NAMES[member] == arch_name:
            return architecture, rule
    return None


#: The module names transformers gives every architecture in ARCHITECTURES (`{bid}`: the layer). The
#: GGUF name map lists many source spellings per tensor (`q_norm` and persimmon's `q_layernorm` both
#: become `attn_q_norm`), so reading a file back needs the one these models use.
DECODER_MODULES = ("model.embed_tokens", "model.norm", "lm_head", *(f"model.layers.{{bid}}.{leaf}" for leaf in (
    "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))


def hf_names(rule: ArchRule, n_layers: int, gguf_names: list[str], gguf) -> dict[str, tuple[str, Any]]:
    """GGUF tensor name -> (transformers name, `gguf.MODEL_TENSOR` kind): DECODER_MODULES sent through
    llama.cpp's own name map, read backwards. Names no module maps to (computed tensors such as
    `rope_freqs`) are left out."""
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, rule.member), n_layers)
    backwards: dict[str, tuple[str, Any]] = {}
    for template in DECODER_MODULES:
        for bid in range(n_layers) if "{bid}" in template else (None,):
            module = template.format(bid=bid)
            found = name_map.get_type_and_name(module)
            if found is not None:
                backwards[found[1]] = (module, found[0])
    found_names = {}
    for name in gguf_names:
        stem, dot, suffix = name.rpartition(".")
        if dot and stem in backwards:
            module, kind = backwards[stem]
            found_names[name] = (f"{module}.{suffix}", kind)
    return found_names


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


@dataclass
class GgufTensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]
    """In torch order (GGUF stores dimensions innermost first)."""
    numel: int
    nbytes: int


@dataclass
class GgufFile:
    """A GGUF file's metadata and tensor directory; `read()` dequantizes one tensor to float32."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]
    _reader: Any = field(repr=False)

    def read(self, name: str) -> torch.Tensor:
        import torch

        gguf = import_gguf()
        raw = next(t for t in self._reader.tensors if t.name == name)
        values = gguf.quants.dequantize(raw.data, raw.tensor_type)
        return torch.from_numpy(values.astype("float32").reshape(self.tensors[name].shape))


def read_gguf(path: str | os.PathLike) -> GgufFile:
    """Open a GGUF file: metadata values (arrays as a `[n × TYPE]` summary) and tensor headers."""
    gguf = import_gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a malformed file fails inside the reader in many ways; all mean "bad file"
        size = path.stat().st_size if path.is_file() else 0
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidCheckpointError(f"{path}: not a readable GGUF file ({size} bytes): truncated, corrupt, or using a "
                                     f"type the installed gguf package does not know (pip install -U gguf); "
                                     f"the gguf reader says: {said}") from e
    metadata = {name: _field_value(f, gguf) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        tensors[t.name] = GgufTensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                                         int(t.n_elements), int(t.n_bytes))
    return GgufFile(path, metadata, tensors, reader)


def _field_value(f, gguf) -> Any:
    """One metadata value, read from the field's raw parts (which every gguf release has)."""
    kinds = f.types
    if not kinds:
        return None
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        return f"[{len(f.data)} × {kinds[-1].name}]"
    value = f.parts[f.data[0]]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0]
