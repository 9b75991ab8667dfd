"""Convert fixtures/tiny-llama to GGUF base models with llama.cpp's own `convert_hf_to_gguf.py`.

    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-*.tar.gz -C /tmp/lcpp
    python scripts/make_gguf_base_fixture.py /tmp/lcpp/llama_cpp_python-*/vendor/llama.cpp

writes fixtures/gguf-base/tiny-llama-f16.gguf and tiny-llama-q8_0.gguf (checked in: tests never need
the converter or the network). The converter needs a tokenizer, which tiny-llama lacks; a 256-token
llama-style BPE tokenizer (byte fallback, no merges) is built here with `tokenizers`, only to let the
converter run: the tests compare weights, not tokens. The converter runs with the `gguf-py` vendored
beside it, the version it was written against. It imports `sentencepiece` before looking for a
`tokenizer.model`, so that must be importable (`pip install --target /tmp/spm sentencepiece` and
PYTHONPATH=/tmp/spm will do). llama.cpp itself is not built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "fixtures" / "tiny-llama"
OUT = ROOT / "fixtures" / "gguf-base"
OUTTYPES = ("f16", "q8_0")


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = [chr(c) for c in range(33, 127)]
    pieces = specials + ["▁"] + chars + ["▁" + c for c in chars]
    pieces += [f"▁{a}{b}" for a in "etaoinsh" for b in "etaoinsh"]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces[:vocab_size]))}
    if len(vocab) != vocab_size:
        raise SystemExit(f"the tokenizer needs {vocab_size} pieces, made {len(vocab)}")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    llama_cpp = Path(sys.argv[1])
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found")
    import json

    vocab_size = json.loads((SOURCE / "config.json").read_text())["vocab_size"]
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny-llama"
        shutil.copytree(SOURCE, model)
        write_tokenizer(model, vocab_size)
        path = os.pathsep.join(filter(None, [str(llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
        for outtype in OUTTYPES:
            target = OUT / f"tiny-llama-{outtype}.gguf"
            subprocess.run([sys.executable, str(script), str(model), "--outfile", str(target), "--outtype", outtype],
                           check=True, env=env, cwd=llama_cpp)
            print(f"{target.relative_to(ROOT)}: {target.stat().st_size} bytes")


if __name__ == "__main__":
    main()
