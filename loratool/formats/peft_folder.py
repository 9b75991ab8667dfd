"""The `peft` format as a whole: a PEFT folder of any `peft_type` (LoRA in `peft.py`, LoHa and LoKr in
`peft_lycoris.py`), or bare PEFT weights without their config."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError, summarize
from ..lora.module import Adapter
from ..lora.conversion import lora_only_refusal
from . import ReadOptions, WriteOptions
from .peft import find_peft_folder, looks_like_bare_peft, read_bare_peft_adapter, read_peft_adapter, write_peft_adapter
from .peft_lycoris import peft_type_of, read_peft_lycoris_adapter, write_peft_lycoris_adapter

looks_like = looks_like_bare_peft


def read(path: Path, options: ReadOptions) -> Adapter:
    folder = find_peft_folder(path)
    if folder is None:
        return read_bare_peft_adapter(path, alpha=options.alpha, allow_pickle=options.allow_pickle,
                                      need_alpha=options.need_alpha, header_only=options.header_only)
    if peft_type_of(folder) is not None:
        return read_peft_lycoris_adapter(path, allow_pickle=options.allow_pickle)
    return read_peft_adapter(path, allow_pickle=options.allow_pickle, header_only=options.header_only)


def write(path: Path, adapter: Adapter, options: WriteOptions) -> list[Path]:
    """PEFT holds one `peft_type` per adapter: plain LoRA goes to a LoRA folder, all-LoHa or all-LoKr
    modules to a PEFT LoHa/LoKr folder; other mixes are refused (`--rank` makes them all LoRA)."""
    algorithms = {m.algorithm for m in adapter.modules.values()}
    if algorithms in ({"loha"}, {"lokr"}):
        ambiguous = [n for n, m in adapter.modules.items() if m.shape_ambiguous]
        # PEFT's LoKr layout depends on the layer type, and so does LoHa's once any conv is Tucker
        if ambiguous and (algorithms == {"lokr"} or any(m.tucker for m in adapter.modules.values())):
            raise AdapterError(f"{summarize(sorted(ambiguous))}: PEFT's layout depends on whether the layer is a "
                               "Linear or a Conv2d, and the file stores conv kernels flattened: pass --base")
        config = {k: v for k, v in (options.config or {}).items() if k != "fan_in_fan_out"}
        return write_peft_lycoris_adapter(path, adapter.modules, adapter.full_tensors, config, options.dtype)
    refusal = lora_only_refusal(adapter.modules, "a PEFT adapter has one peft_type: plain LoRA, or every module "
                                                 "LoHa, or every module LoKr")
    if refusal is not None:
        raise refusal
    return write_peft_adapter(path, adapter.modules, adapter.full_tensors, options.config or {}, options.dtype)
