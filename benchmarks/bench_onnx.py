"""Benchmark merged vs base vs unmerged-LoRA inference in ONNX Runtime, and PyTorch eager, in one run.

Builds a Llama-shaped float32 model of about 100M parameters from a config (hidden 768, 12 layers,
intermediate 2048, vocab 32000) and a rank-16 PEFT LoRA on q/k/v/o, then runs `loratool.bench_onnx`
at batch 1, sequence 128 (the LoRA paper's latency setting): the three graphs and PyTorch are timed
interleaved, round by round, and medians are compared. The bar is merged/base ≤ 1.05.

Usage: python benchmarks/bench_onnx.py [--provider cuda] [--repeats 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(work: Path, hidden: int, layers: int, intermediate: int, vocab: int, rank: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / "onnx_base", work / "onnx_lora"
    stamp = work / "onnx_pair.json"
    spec = {"hidden": hidden, "layers": layers, "intermediate": intermediate, "vocab": vocab, "rank": rank}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return base, adapter
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(base)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(adapter)
    stamp.write_text(json.dumps(spec))
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from loratool.api.bench_onnx import bench_onnx

    args.work.mkdir(parents=True, exist_ok=True)
    base, adapter = build(args.work, args.hidden, args.layers, args.intermediate, args.vocab, args.rank)
    graphs = args.work / f"onnx_graphs_{args.hidden}x{args.layers}"
    result = bench_onnx(base, adapter, batch=args.batch, sequence=args.seq, provider=args.provider,
                        repeats=args.repeats, work=graphs, progress=lambda text: print(text, file=sys.stderr))
    import torch

    from loratool import inspect

    report = result.to_json()
    report["parameters"] = inspect(base)["parameters"]
    report["torch_threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"bench-onnx: Llama-shaped {report['parameters'] / 1e6:.0f}M parameters, rank-{args.rank} LoRA on q/k/v/o, "
          f"batch {args.batch}, seq {args.seq}, {result.provider}, median of {args.repeats}")
    for label, value in report["median_ms"].items():
        print(f"  {label:22s} {value:9.2f} ms")
    for label, value in report["ratios"].items():
        print(f"  {label:26s} {value:.3f}")
    for note in report["notes"]:
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
