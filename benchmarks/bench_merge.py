"""Benchmark `loratool merge` against its baselines in one run, durably.

Builds (once, cached under benchmarks/.work/, never committed) a Llama-shaped bf16 sharded checkpoint
and a rank-16 PEFT adapter on every linear, then times, each in its own process and interleaved
round by round so that drift from other users of the machine hits every command alike:
  cp+sync   `cp -r` of the base folder, then `sync` of the copied files and folders: the durable I/O floor
  peft      transformers load + PeftModel.from_pretrained + merge_and_unload + save_pretrained, then the
            same `sync` of its output
  loratool  `loratool merge BASE ADAPTER -o OUT` (which fsyncs every file and folder it publishes)
  api       the `loratool.merge()` call alone inside a process that already imported torch
and prints median wall times, the ratios, and peak RSS minus the interpreter's own baseline (a
`python -c "import torch"` child) against the checkpoint size.

Cases: `--case small` (default: hidden 2048, 8 layers, 1.1 GB in 3 shards), `--case large`
(hidden 4096, 9 layers, intermediate 11008, 4.2 GB in 2 shards) and `--case embed` (2 layers and a
1 GB embedding, vocab 128000, that the adapter targets as well: memory must not grow with it), `--case fp8`
(13 layers block-scaled float8 as DeepSeek-V3 ships, 3.2 GB; merged into its own encoding, no PEFT
baseline since PEFT cannot merge into FP8). `--profile` runs the
merge in-process and splits its time into read, ΔW math, cast/copy into the output dtype, write, and fsync.

Usage: python benchmarks/bench_merge.py [--case large] [--repeat 5] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "small": dict(hidden=2048, layers=8, vocab=32000, intermediate=5632, shards=3),
    "large": dict(hidden=4096, layers=9, vocab=32000, intermediate=11008, shards=2),
    # A 1 GB embedding that the adapter targets too: peak RSS must not grow with it.
    "embed": dict(hidden=4096, layers=2, vocab=128000, intermediate=11008, shards=2, embed=True),
    # DeepSeek-V3 / Qwen3-FP8 style: every layer's linears block-scaled float8 (128×128), 3.2 GB; each
    # changed tensor is dequantized, merged and requantized with fresh scales (docs/quantized.md).
    "fp8": dict(hidden=4096, layers=13, vocab=32000, intermediate=11008, shards=2, fp8=True),
}
PEFT_SCRIPT = """
import os, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""
# The merge alone, without the seconds that importing torch costs any Python tool before it starts.
API_SCRIPT = """
import sys, time, torch, loratool.api.merge
started = time.perf_counter()
loratool.merge(sys.argv[1], [sys.argv[2]], sys.argv[3])
print(time.perf_counter() - started)
"""
BASELINE_SCRIPT = "import torch"


def build(work: Path, hidden: int, layers: int, vocab: int, intermediate: int, rank: int, shards: int,
          embed: bool = False, fp8: bool = False) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / "base", work / "adapter"
    if (base / "model.safetensors.index.json").exists() and (adapter / "adapter_config.json").exists():
        return
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: half the memory, no float32 copy
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    # Every full shard then holds more than 1/shards of the model, so greedy packing gives exactly `shards`.
    model.save_pretrained(base, max_shard_size=f"{(size // shards + largest) // 10**6 + 1}MB")
    if fp8:
        block_scale(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets += ["embed_tokens"] if embed else []
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  init_lora_weights=False))
    # PEFT would also save the 1 GB embedding itself (`base_layer`, for resized vocabularies); that copy
    # is the adapter's, loaded whole with it, so the embed case leaves it out to measure the merge.
    peft_model.save_pretrained(adapter, save_embedding_layers=False if embed else "auto")


def block_scale(folder: Path) -> None:
    """Rewrite a saved bf16 folder as an HF FP8 block-scaled checkpoint, shard by shard."""
    import torch
    from safetensors.torch import load_file, save_file

    from loratool.quant.fp8 import block_amax, fresh_scale, quantize

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(str(shard))
        for name in [n for n in state if ".layers." in n and n.endswith("proj.weight")]:
            values = state[name].float()
            scale = fresh_scale(block_amax(values, (128, 128)), "F8_E4M3", torch.float32)
            state[name] = quantize(values, scale, (128, 128), "F8_E4M3")
            state[name + "_scale_inv"] = scale
            index["weight_map"][name + "_scale_inv"] = shard.name
        save_file(state, str(shard), metadata={"format": "pt"})
        del state
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def drop_outputs(work: Path) -> None:
    for out in work.glob("out_*"):
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)


def warm(base: Path) -> None:
    """Read the base into the page cache, in chunks (a forked child starts from this process's RSS peak)."""
    for shard in sorted(base.glob("*.safetensors")):
        with shard.open("rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def run_child(argv: list[str]) -> tuple[float, int, str]:
    """Like `timed`, with the child's peak RSS from wait4."""
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read the pipes in threads, then reap with wait4 to get the child's own rusage.
    chunks: dict[str, bytes] = {}

    def drain(name, stream):
        chunks[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    for t in threads:
        t.join()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{chunks['err'].decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024, chunks["out"].decode()


def sync_command(out: Path) -> str:
    """fsync every file and folder of `out` and its parent, as loratool does before and after its rename."""
    return f"sync {out}/* {out} {out.parent}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--peft-repeat", type=int, default=1, help="rounds that include PEFT (it is slow)")
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--profile", action="store_true", help="also split the in-process merge time by phase")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT (and the comparison against it)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = CASES[args.case]
    args.no_peft = args.no_peft or case.get("fp8", False)
    work = args.work / f"merge-{args.case}"
    work.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build(work, case["hidden"], case["layers"], case["vocab"], case["intermediate"], args.rank, case["shards"],
              case.get("embed", False), case.get("fp8", False))
        return
    # Build in a child so that this parent stays small: a forked child inherits the parent's RSS peak.
    subprocess.run([sys.executable, __file__, "--build-only", "--case", args.case, "--work", str(args.work),
                    "--rank", str(args.rank)], check=True, stderr=subprocess.DEVNULL)
    base, adapter = work / "base", work / "adapter"
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    drop_outputs(work)

    loratool = [sys.executable, "-m", "loratool", "--quiet", "merge", str(base), str(adapter)]
    commands = {
        "cp+sync": lambda out: ["sh", "-c", f"cp -r {base} {out} && {sync_command(out)}"],
        "peft+sync": lambda out: ["sh", "-c", f"{sys.executable} -c '{PEFT_SCRIPT}' {base} {adapter} {out} && "
                                              f"{sync_command(out)}"],
        "loratool": lambda out: loratool + ["-o", str(out)],
        "api": lambda out: [sys.executable, "-c", API_SCRIPT, str(base), str(adapter), str(out)],
    }
    if args.no_peft:
        del commands["peft+sync"]
    walls: dict[str, list[float]] = {name: [] for name in commands}
    rss: dict[str, list[int]] = {name: [] for name in commands}
    baseline_rss = []
    for round_ in range(args.repeat):
        for name, command in commands.items():
            if name == "peft+sync" and round_ >= args.peft_repeat:
                continue
            warm(base)
            out = work / f"out_{name.split('+')[0]}"
            wall, peak, stdout = run_child(command(out))
            walls[name].append(float(stdout) if name == "api" else wall)
            rss[name].append(peak)
            if name != "peft+sync" or args.no_peft:
                drop_outputs(work) if name != "loratool" else None
        baseline_rss.append(run_child([sys.executable, "-c", BASELINE_SCRIPT])[1])
        if round_ + 1 < args.repeat:
            drop_outputs(work)
    baseline = statistics.median(baseline_rss)
    # RSS minus the baseline means something for the Python commands only (cp+sync is not Python).
    results = {name: {"seconds": statistics.median(walls[name]), "runs": [round(w, 3) for w in walls[name]],
                      "peak_rss_bytes": max(rss[name]),
                      "peak_rss_minus_baseline_bytes": None if name == "cp+sync" else max(rss[name]) - baseline}
               for name in commands if walls[name]}
    summary = {
        "case": args.case,
        "checkpoint_bytes": size,
        "baseline_rss_bytes": baseline,
        "results": results,
        "ours_over_cp_sync": results["loratool"]["seconds"] / results["cp+sync"]["seconds"],
        "api_over_cp_sync": results["api"]["seconds"] / results["cp+sync"]["seconds"],
        "ours_rss_minus_baseline_over_checkpoint": results["loratool"]["peak_rss_minus_baseline_bytes"] / size,
        "ours_rss_over_checkpoint": results["loratool"]["peak_rss_bytes"] / size,
    }
    if not args.no_peft:
        summary["ours_over_peft_sync"] = results["loratool"]["seconds"] / results["peft+sync"]["seconds"]
        summary["peft_rss_over_checkpoint"] = results["peft+sync"]["peak_rss_bytes"] / size
        summary["max_abs_diff_vs_peft"] = compare(work / "out_loratool", work / "out_peft")
    drop_outputs(work)
    if args.profile:
        summary["profile"] = profile(base, adapter, work / "out_profile")
        drop_outputs(work)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    report(summary, args, base)


def report(summary: dict, args, base: Path) -> None:
    size = summary["checkpoint_bytes"]
    print(f"case {args.case}: {size / 1e9:.2f} GB bf16 in {len(list(base.glob('*.safetensors')))} shards, adapter "
          f"rank {args.rank} on every linear; medians of {args.repeat} interleaved rounds")
    print(f"{'command':<11}{'median s':>10}{'peak RSS MB':>13}{'- baseline':>12}   runs")
    for name, r in summary["results"].items():
        minus = r["peak_rss_minus_baseline_bytes"]
        print(f"{name:<11}{r['seconds']:>10.2f}{r['peak_rss_bytes'] / 1e6:>13.0f}"
              f"{'-' if minus is None else f'{minus / 1e6:.0f}':>12}   {r['runs']}")
    print(f"baseline RSS (python -c 'import torch'): {summary['baseline_rss_bytes'] / 1e6:.0f} MB")
    print(f"loratool / cp+sync   = {summary['ours_over_cp_sync']:.2f}   (bar 1.5, goal 1.2)")
    print(f"api / cp+sync        = {summary['api_over_cp_sync']:.2f}   (the merge call alone, torch already imported)")
    if "ours_over_peft_sync" in summary:
        print(f"loratool / peft+sync = {summary['ours_over_peft_sync']:.3f}  (bar 0.2)")
    print(f"peak RSS - baseline over checkpoint: loratool {summary['ours_rss_minus_baseline_over_checkpoint']:.3f} "
          f"(bar 0.15); raw loratool {summary['ours_rss_over_checkpoint']:.3f}"
          + (f", PEFT {summary['peft_rss_over_checkpoint']:.2f}" if "peft_rss_over_checkpoint" in summary else ""))
    if "max_abs_diff_vs_peft" in summary:
        print(f"max |loratool - PEFT| over all tensors: {summary['max_abs_diff_vs_peft']:.3g} (bf16; PEFT rounds twice)")
    if "profile" in summary:
        p = summary["profile"]
        print(f"profile of one in-process merge ({p['wall']:.2f} s wall; thread seconds overlap):")
        for phase, seconds in p["phases"].items():
            print(f"  {phase:<28}{seconds:>8.2f} s")


def profile(base: Path, adapter: Path, out: Path) -> dict:
    """Run one merge in a child with each phase wrapped in a timer (seconds per phase, summed over threads)."""
    script = PROFILE_SCRIPT
    _, _, stdout = run_child([sys.executable, "-c", script, str(base), str(adapter), str(out)])
    return json.loads(stdout.strip().splitlines()[-1])


PROFILE_SCRIPT = r"""
import json, os, sys, threading, time
from collections import defaultdict
import torch
import loratool.api.merge as m
import loratool.checkpoint.reader as reader
import loratool.checkpoint.writer as writer
import loratool.checkpoint.output as output
import loratool.lora.delta as delta

phases = defaultdict(float)
lock = threading.Lock()

def timed(label, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            with lock:
                phases[label] += time.perf_counter() - t
    return wrapper

def patch(owner, name, label):  # tolerant of older loratool versions, to profile them too
    if hasattr(owner, name):
        setattr(owner, name, timed(label, getattr(owner, name)))

patch(reader.Checkpoint, "read", "read changed tensors (pread)")
patch(reader.Checkpoint, "read_rows", "read changed tensors (pread)")
patch(m, "add_deltas_blockwise", "delta math + cast (addmm_)")
# Write side; the disk writes are timed on their own and taken out of the staging phases below.
patch(writer, "_pwrite_all", "write to disk (pwrite)")
patch(writer, "_write_all", "write to disk (write)")
patch(writer, "_copy_range", "copy untouched (copy_file_range)")
if hasattr(writer, "_DirectSink"):
    patch(writer._DirectSink, "write_tensor", "stage changed tensors")
    patch(writer._DirectSink, "read_from", "stage untouched (pread)")
    patch(writer._DirectSink, "finish", "stage changed tensors")
os.fsync = timed("fsync", os.fsync)
os.fdatasync = timed("fsync", os.fdatasync)
base, adapter, out = sys.argv[1:4]
started = time.perf_counter()
m.load_adapter = timed("load adapter + plan", m.load_adapter)
m.merge(base, [adapter], out)
wall = time.perf_counter() - started
staged = phases.get("stage changed tensors", 0) + phases.get("stage untouched (pread)", 0)
if staged:  # the staging phases include the pwrite calls they made; show the copy into the buffer alone
    share = phases.get("stage changed tensors", 0) / staged
    pwrite = phases.get("write to disk (pwrite)", 0)
    for label, part in (("stage changed tensors", share), ("stage untouched (pread)", 1 - share)):
        if label in phases:
            phases[label] = max(0.0, phases[label] - pwrite * part)
print(json.dumps({"wall": wall, "phases": dict(phases)}))
"""


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
