"""A GGUF model file as a `Checkpoint`: every tensor a logical float32 tensor encoded as its GGUF type.

Two kinds of GGUF model are read:
- llama.cpp LLMs of an architecture loratool has a name map for (`gguf_arch.ARCHITECTURES`): tensors
  are named as transformers names them (`blk.0.attn_q.weight` is `model.layers.0.self_attn.q_proj.weight`,
  by llama.cpp's own map read backwards), the q/k rows that the converter interleaved per head are put
  back in HF order on read, and `config()` is an HF-style config built from the GGUF metadata, so that
  layouts and PEFT adapters resolve against the file as against the HF folder it came from;
- anything else (the diffusion GGUFs of ComfyUI-GGUF and stable-diffusion.cpp, whose tensors keep their
  safetensors names, and LLMs of other architectures): names as stored, and no config. ComfyUI-GGUF
  flattens some 5-D tensors and records the true shape as `comfy.gguf.orig_shape.<name>`.

GGUF lists dimensions innermost first; logical shapes here are in torch order. Each tensor's bytes are
its physical view (`stored`: uint8, one row of bytes per row), read with positional reads like any
checkpoint; the `gguf` reader is used for the header and metadata only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidCheckpointError, UsageError, summarize
from ..jsonio import MAX_HEADS, MAX_LAYERS
from ..quant import GGUF, Encoding
from .header import TensorInfo
from .base import Checkpoint

if TYPE_CHECKING:
    import torch

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class GgufPlace:
    """Where one logical tensor lives in the file, and how its stored values differ from it."""

    stored_name: str
    type_name: str
    #: The stored values' shape in torch order (before `comfy.gguf.orig_shape` restores the logical one).
    stored_shape: tuple[int, ...]
    #: Heads whose rotary pairs llama.cpp interleaved (q/k of llama-arch models); None: HF row order.
    rope_heads: int | None = None


@dataclass
class GgufCheckpoint(Checkpoint):
    architecture: str = ""
    #: logical name -> its place in the file, in the file's tensor order.
    places: dict[str, GgufPlace] = field(default_factory=dict)
    hf_config: dict | None = None
    #: The `gguf.GGUFReader` of the file: its metadata fields are copied into a merged file.
    reader: Any = field(default=None, repr=False)

    def config(self) -> dict | None:
        return self.hf_config

    def read(self, name: str) -> torch.Tensor:
        """float32 values in torch order, q/k rows in HF order."""
        return self.from_stored(name, super().read(name))

    def from_stored(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """Dequantized stored values of `name` -> the logical tensor."""
        from ..lora.llamacpp import deinterleave_rope_rows

        place = self.places[name]
        values = values.reshape(self.tensors[name].shape)
        return deinterleave_rope_rows(values, place.rope_heads) if place.rope_heads else values

    def to_stored(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """A logical tensor -> values in the order and shape the file stores them."""
        from ..lora.llamacpp import interleave_rope_rows

        place = self.places[name]
        if place.rope_heads:
            values = interleave_rope_rows(values, place.rope_heads)
        return values.reshape(place.stored_shape)

    def close(self) -> None:
        super().close()
        self.reader = None


def open_gguf_checkpoint(path: str | os.PathLike) -> GgufCheckpoint:
    """Open a GGUF model file, checking every tensor's type and extent before returning."""
    from ..gguf_arch import hf_names, rope_heads, rule_for_gguf_arch
    from ..gguf_file import import_gguf, read_gguf
    from ..quant.gguf_codec import can_read

    gguf = import_gguf()
    path = Path(path)
    gguf_file = read_gguf(path)
    reader, metadata = gguf_file._reader, gguf_file.metadata
    tensors = list(reader.tensors)
    if getattr(reader, "byte_order", "I") == "S":
        raise InvalidCheckpointError(f"{path}: a GGUF file of the other byte order (big-endian); loratool reads "
                                     "little-endian GGUF files only")
    if metadata.get("general.type") == "adapter" or any(t.name.endswith(ADAPTER_SUFFIXES) for t in tensors):
        raise UsageError(f"{path} is a LoRA adapter, not a base model (pass it as an ADAPTER)")
    _check_tensors(path, tensors, can_read)
    architecture = str(metadata.get("general.architecture") or "")
    found = rule_for_gguf_arch(architecture, gguf)
    names: dict[str, tuple[str, Any]] = {}
    config = None
    if found is not None:
        hf_architecture, rule = found
        config = _hf_config(path, metadata, architecture, hf_architecture, {t.name: t for t in tensors})
        names = hf_names(rule, config["num_hidden_layers"], [t.name for t in tensors], gguf)
    logical: dict[str, TensorInfo] = {}
    stored: dict[str, TensorInfo] = {}
    places: dict[str, GgufPlace] = {}
    for t in tensors:
        type_name = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        byte_shape = (*shape[:-1], shape[-1] // block * type_size) if shape else (type_size,)
        physical = TensorInfo(name=t.name, dtype="U8", shape=byte_shape, path=path, data_start=int(t.data_offset),
                              nbytes=int(t.n_bytes))
        name, kind = names.get(t.name, (t.name, None))
        heads = None
        if kind is not None:
            heads = rope_heads(found[1], kind, config["num_attention_heads"], config["num_key_value_heads"], gguf)
            if heads is not None and shape[0] % (2 * heads):
                raise InvalidCheckpointError(f"{path}: {t.name} has {shape[0]} rows, which do not split into "
                                             f"rotary pairs of {heads} heads")
        logical_shape = _orig_shape(reader, t.name, shape, path)
        encoding = Encoding(GGUF, type_name, physical, form=architecture)
        logical[name] = TensorInfo(name=name, dtype="F32", shape=logical_shape, path=path,
                                   data_start=int(t.data_offset), nbytes=int(t.n_bytes), encoding=encoding)
        stored[t.name] = physical
        places[name] = GgufPlace(t.name, type_name, shape, heads)
    scalars = {key: str(value) for key, value in metadata.items() if not str(value).startswith("[")}
    return GgufCheckpoint(path=path, is_folder=False, files=[path], tensors=logical, metadata={path.name: scalars},
                          stored=stored, architecture=architecture, places=places, hf_config=config, reader=reader)


def _check_tensors(path: Path, tensors: list, can_read) -> None:
    """Every tensor of a type the `gguf` package dequantizes, and inside the file."""
    size = path.stat().st_size
    unreadable = sorted({t.tensor_type.name for t in tensors if not can_read(t.tensor_type.name)})
    if unreadable:
        names = [t.name for t in tensors if t.tensor_type.name in unreadable]
        raise InvalidCheckpointError(f"{path}: tensor type {', '.join(unreadable)} cannot be dequantized by the "
                                     f"installed gguf package ({summarize(names, 3)}); try pip install -U gguf")
    past = [t.name for t in tensors if int(t.data_offset) + int(t.n_bytes) > size]
    if past:
        raise InvalidCheckpointError(f"{path}: file ends before the data of {summarize(past, 3)} (truncated?)")


def _orig_shape(reader, name: str, shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>` (torch order), checked against the stored size."""
    import math

    entry = reader.fields.get(ORIG_SHAPE_KEY + name)
    if entry is None:
        return shape
    try:
        orig = tuple(int(d) for d in entry.contents())
    except (TypeError, ValueError) as e:
        raise InvalidCheckpointError(f"{path}: {ORIG_SHAPE_KEY}{name} is not a list of dimensions") from e
    if math.prod(orig) != math.prod(shape) or any(d < 0 for d in orig):
        raise InvalidCheckpointError(f"{path}: {ORIG_SHAPE_KEY}{name} is {list(orig)}, which does not hold the "
                                     f"{math.prod(shape)} values stored")
    return orig


def _hf_config(path: Path, metadata: dict, arch: str, hf_architecture: str, tensors: dict) -> dict:
    """An HF config.json for the model, from the GGUF's `<arch>.*` keys and tensor shapes."""

    def number(key: str, required: bool = True) -> Any:
        value = metadata.get(key.format(arch=arch))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if required:
                raise InvalidCheckpointError(f"{path}: needs a number at {key.format(arch=arch)}")
            return None
        return value

    heads = int(number("{arch}.attention.head_count"))
    hidden = int(number("{arch}.embedding_length"))
    embedding = tensors.get("token_embd.weight")
    config = {
        "architectures": [hf_architecture],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(number("{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(number("{arch}.attention.head_count_kv", False) or heads),
        "intermediate_size": int(number("{arch}.feed_forward_length")),
        "vocab_size": int(embedding.shape[-1]) if embedding is not None else None,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    optional = {"head_dim": "{arch}.attention.key_length", "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
                "rope_theta": "{arch}.rope.freq_base", "max_position_embeddings": "{arch}.context_length"}
    for key, source in optional.items():
        value = number(source, False)
        if value is not None:
            config[key] = value
    if not (0 < config["num_hidden_layers"] <= MAX_LAYERS and 0 < heads <= MAX_HEADS
            and 0 < config["num_key_value_heads"] <= MAX_HEADS):
        raise InvalidCheckpointError(f"{path}: layer and head counts must be from 1 to {MAX_LAYERS} and {MAX_HEADS}")
    return config
