"""The README.md model card pushed with an adapter, built with huggingface_hub's own ModelCardData so
that its YAML header is what the Hub validates."""

from __future__ import annotations

import re
from pathlib import Path

from ..lora.module import Adapter
from ..units import format_bytes

#: PEFT task type -> Hub pipeline tag.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_base_model(adapter: Adapter, override: str | None = None) -> str | None:
    """The base model as a Hub id, or None when it is only known as a local path."""
    candidate = override or adapter.base_model
    if not candidate or Path(candidate).exists() or not _REPO_ID.match(candidate) or candidate.startswith("."):
        return None
    return candidate


def adapter_card(adapter: Adapter, repo_id: str, adapter_bytes: int, base_model: str | None = None):
    """A `huggingface_hub.ModelCard` describing the adapter: YAML header and a short body."""
    from huggingface_hub import ModelCard, ModelCardData

    base = hub_base_model(adapter, base_model)
    task = adapter.config.get("task_type")
    tags = ["lora", "loratool", "peft"] + ([f"base_model:adapter:{base}"] if base else [])
    data = ModelCardData(base_model=base, library_name="peft", tags=tags, pipeline_tag=PIPELINE_TAGS.get(task))
    modules = adapter.modules.values()
    ranks = sorted({m.rank for m in modules})
    alphas = sorted({m.alpha for m in modules})
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapter.modules})
    parameters = sum(m.lora_A.numel() + m.lora_B.numel() for m in modules)
    flags = [label for label, on in (("rsLoRA", adapter.use_rslora), ("DoRA", adapter.use_dora)) if on]
    base_text = f"[`{base}`](https://huggingface.co/{base})" if base else "its base model"
    rows = [
        ("rank r", ", ".join(map(str, ranks))),
        ("lora_alpha", ", ".join(f"{a:g}" for a in alphas)),
        ("target modules", ", ".join(f"`{t}`" for t in targets)),
        ("adapted modules", str(len(adapter.modules))),
        ("trainable parameters", f"{parameters:,}"),
        ("size", format_bytes(adapter_bytes)),
        ("variants", ", ".join(flags) or "plain LoRA"),
    ]
    if adapter.full_tensors:
        rows.append(("whole tensors (modules_to_save)", ", ".join(sorted(adapter.full_tensors))))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    base_id = base or "BASE_MODEL"
    body = f"""
# {repo_id.split("/")[-1]}

A LoRA adapter for {base_text}, published with loratool.

{table}

## How to use

With PEFT:

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel

model = AutoModelForCausalLM.from_pretrained("{base_id}")
model = PeftModel.from_pretrained(model, "{repo_id}")
```

Merged into the base weights, so inference runs exactly as fast as the base model:

```bash
loratool merge hf://{base_id} hf://{repo_id} -o merged/
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
