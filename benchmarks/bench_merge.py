"""Benchmark `loratool merge` against its baselines in one run.

Builds a Llama-shaped bf16 checkpoint in 3 shards (hidden 2048, 8 layers, vocab 32000: about 1.1 GB)
and a rank-16 PEFT adapter on every linear, then times, each in its own process:
  cp       `cp -r` of the base folder: the I/O floor
  peft     transformers load + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  loratool `loratool merge BASE ADAPTER -o OUT`
and prints wall-time ratios and peak RSS against the checkpoint size. Scale with --hidden/--layers
(e.g. on a GPU machine). Usage: python benchmarks/bench_merge.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""
# The merge alone, without the ~1.7 s that importing torch costs any Python tool before it starts.
API_SCRIPT = """
import sys, time, loratool
started = time.perf_counter()
loratool.merge(sys.argv[1], [sys.argv[2]], sys.argv[3])
print(time.perf_counter() - started)
"""


def build(work: Path, hidden: int, layers: int, vocab: int, intermediate: int, rank: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / "base", work / "adapter"
    if (base / "model.safetensors.index.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    # Every full shard then holds more than a third of the model, so greedy packing gives exactly 3.
    model.save_pretrained(base, max_shard_size=f"{(size // 3 + largest) // 10**6 + 1}MB")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    return base, adapter


def timed(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds and peak RSS (bytes) of one child process, started after flushing dirty pages so
    that no command pays for an earlier one's writeback."""
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed:\n{stderr}")
    return wall, usage.ru_maxrss * 1024, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="runs per command; the fastest counts")
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build(args.work, args.hidden, args.layers, args.vocab, args.intermediate, args.rank)
        return
    # Build in a child so that this parent stays small: a forked child inherits the parent's RSS peak.
    subprocess.run([sys.executable, __file__, "--build-only", "--work", str(args.work), "--hidden", str(args.hidden),
                    "--layers", str(args.layers), "--vocab", str(args.vocab), "--intermediate",
                    str(args.intermediate), "--rank", str(args.rank)], check=True, stderr=subprocess.DEVNULL)
    base, adapter = args.work / "base", args.work / "adapter"
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    for shard in base.glob("*.safetensors"):  # warm the page cache so that no command pays for cold reads
        with shard.open("rb") as f:  # in chunks: a forked child starts from this process's RSS peak
            while f.read(16 << 20):
                pass
    loratool = [sys.executable, "-m", "loratool", "--quiet", "merge", str(base), str(adapter)]
    api = [sys.executable, "-c", API_SCRIPT, str(base), str(adapter)]
    commands = {
        "cp": lambda out: ["cp", "-r", str(base), str(out)],
        "write": lambda out: ["dd", "if=/dev/zero", f"of={out}", "bs=16M", f"count={-(-size // (16 << 20))}"],
        "peft": lambda out: [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)],
        "loratool": lambda out: loratool + ["-o", str(out)],
        "api": lambda out: api + [str(out)],
    }
    results: dict[str, dict[str, float]] = {}
    for name, command in commands.items():
        best = None
        for _ in range(args.repeat if name != "peft" else 1):
            out = args.work / f"out_{name}"
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            wall, rss, stdout = timed(command(out))
            if name == "api":
                wall = float(stdout)
            if best is None or wall < best[0]:
                best = (wall, rss)
        results[name] = {"seconds": best[0], "peak_rss_bytes": best[1]}
    summary = {
        "checkpoint_bytes": size,
        "results": results,
        "ours_over_cp": results["loratool"]["seconds"] / results["cp"]["seconds"],
        "ours_over_write": results["loratool"]["seconds"] / results["write"]["seconds"],
        "api_over_cp": results["api"]["seconds"] / results["cp"]["seconds"],
        "ours_over_peft": results["loratool"]["seconds"] / results["peft"]["seconds"],
        "ours_rss_over_checkpoint": results["loratool"]["peak_rss_bytes"] / size,
        "peft_rss_over_checkpoint": results["peft"]["peak_rss_bytes"] / size,
    }
    summary["max_abs_diff_vs_peft"] = compare(args.work / "out_loratool", args.work / "out_peft")
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards, "
          f"adapter rank {args.rank} on every linear")
    print(f"{'command':<10}{'wall s':>10}{'peak RSS MB':>14}")
    for name, r in results.items():
        print(f"{name:<10}{r['seconds']:>10.2f}{r['peak_rss_bytes'] / 1e6:>14.0f}")
    print(f"loratool / cp   = {summary['ours_over_cp']:.2f}   (bar 2.0, aim 1.3)")
    print(f"loratool / write = {summary['ours_over_write']:.2f}  (write: dd of the same byte count of new data)")
    print(f"api / cp        = {summary['api_over_cp']:.2f}   (the merge call alone, torch already imported)")
    print(f"loratool / PEFT = {summary['ours_over_peft']:.3f}  (bar 0.5, aim 0.12)")
    print(f"peak RSS / checkpoint: loratool {summary['ours_rss_over_checkpoint']:.3f} (bar 0.5, aim 0.15), "
          f"PEFT {summary['peft_rss_over_checkpoint']:.2f}")
    print(f"max |loratool - PEFT| over all tensors: {summary['max_abs_diff_vs_peft']:.3g} (bf16; PEFT rounds twice)")


def compare(ours: Path, peft: Path) -> float:
    from safetensors import safe_open

    def tensors(folder: Path):
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    yield key, file

    theirs = dict(tensors(peft))
    worst = 0.0
    for key, file in tensors(ours):
        with safe_open(file, "pt") as a, safe_open(theirs[key], "pt") as b:
            worst = max(worst, (a.get_tensor(key).float() - b.get_tensor(key).float()).abs().max().item())
    return worst


if __name__ == "__main__":
    main()
