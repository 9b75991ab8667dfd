"""Benchmark `loratool svd-extract` against the peers' full SVD, in one run.

Builds a Llama-shaped bf16 base (hidden 2048, intermediate 5632, 4 layers, vocab 32000, 2 shards) and a
"full fine-tune" of it: every linear moves by a decaying-spectrum ΔW (rank-256 power law) plus dense
noise, and the norms move a little. Then, at rank 16, times in this one process:
  peers     mergekit/kohya's method: full `torch.linalg.svd(ΔW, full_matrices=False)` per module,
            truncated to rank 16 (this is also the Eckart–Young optimum, so it is the error oracle)
  exact     `svd_extract(..., exact=True)`
  loratool  `svd_extract(...)`: randomized SVD, the default
and `loratool svd-extract` as a subprocess (torch import included). Prints wall-time ratios and each
method's Frobenius error relative to the optimum (worst module and all modules together).

Scale with --hidden/--intermediate/--layers; `--preset 8b` is a Llama-3-8B-shaped pair (32 layers,
~16 GB per checkpoint in bf16), meant for a GPU machine with `--device cuda`.
Usage: python benchmarks/bench_svd_extract.py [--device cuda] [--preset 8b] [--skip-peers]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {
    "default": dict(hidden=2048, intermediate=5632, layers=4, kv_heads=16, vocab=32000),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, kv_heads=8, vocab=128256),
}


def shapes(hidden: int, intermediate: int, layers: int, kv_heads: int, vocab: int) -> dict[str, tuple[int, ...]]:
    kv = 128 * kv_heads
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    out.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return out


def realistic_delta(out: int, inp: int, generator: torch.Generator) -> torch.Tensor:
    """A power-law spectrum over 256 directions (σᵢ ∝ i^-0.8) plus dense noise holding ~10% of the energy."""
    k = 256
    left = torch.randn(out, k, generator=generator) / math.sqrt(out)
    right = torch.randn(k, inp, generator=generator) / math.sqrt(inp)
    sigma = 2e-2 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
    signal = (left * sigma) @ right
    noise = torch.randn(out, inp, generator=generator)
    noise *= 0.33 * signal.norm() / noise.norm()
    return signal + noise


def build(work: Path, spec: dict) -> tuple[Path, Path]:
    base, tuned = work / "svd_base", work / "svd_finetuned"
    stamp = work / "svd_pair.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return base, tuned
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(tuned, ignore_errors=True)
    base.mkdir(parents=True)
    tuned.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    layout = shapes(**spec)
    names = list(layout)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for index, part in enumerate(halves, start=1):
        file = f"model-{index:05d}-of-00002.safetensors"
        base_part, tuned_part = {}, {}
        for name in part:
            shape = layout[name]
            weight = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            moved = weight.clone()
            if name.split(".")[-2] in LINEARS:
                moved += realistic_delta(*shape, generator)
            elif len(shape) == 1:
                moved += 0.01 * torch.randn(shape, generator=generator)
            base_part[name], tuned_part[name] = weight.bfloat16(), moved.bfloat16()
            weight_map[name] = file
        save_file(base_part, str(base / file), metadata={"format": "pt"})
        save_file(tuned_part, str(tuned / file), metadata={"format": "pt"})
    for folder in (base, tuned):
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": spec["hidden"]}
        (folder / "config.json").write_text(json.dumps(config))
    stamp.write_text(json.dumps(spec))
    return base, tuned


def peers_extract(base: Path, tuned: Path, out: Path, rank: int, device: str) -> dict[str, torch.Tensor]:
    """The peers' method: full SVD of every changed 2-D linear ΔW, truncated; returns module -> ΔW error."""
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    factors, errors = {}, {}
    for name, file in index.items():
        if name.split(".")[-2] not in LINEARS:
            continue
        with safe_open(base / file, "pt") as b, safe_open(tuned / file, "pt") as t:
            delta = t.get_tensor(name).to(device, torch.float32) - b.get_tensor(name).to(device, torch.float32)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        B, A = U[:, :rank] * S[:rank], Vh[:rank]
        factors[f"{name[:-7]}.lora_B.weight"], factors[f"{name[:-7]}.lora_A.weight"] = B.cpu().contiguous(), A.cpu().contiguous()
        errors[name[:-7]] = float(S[rank:].square().sum().sqrt() / S.square().sum().sqrt())
    out.mkdir(parents=True, exist_ok=True)
    save_file(factors, str(out / "adapter_model.safetensors"))
    return errors


def timed(call):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"  {getattr(call, '__name__', 'step')}: {seconds:.2f}s", file=sys.stderr)
    return seconds, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-peers", action="store_true", help="skip the full-SVD runs (peers and --exact)")
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from loratool import svd_extract

    spec = dict(PRESETS[args.preset])
    spec.update({k: v for k, v in (("hidden", args.hidden), ("intermediate", args.intermediate),
                                   ("layers", args.layers)) if v is not None})
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, tuned = build(args.work, spec)
    print(f"built pair in {time.perf_counter() - started:.1f}s: {spec}", file=sys.stderr)
    outputs = args.work / "svd_out"
    shutil.rmtree(outputs, ignore_errors=True)

    def ours(name: str, exact: bool):
        return svd_extract(base, tuned, outputs / name, rank=args.rank, exact=exact, device=args.device)

    ours("warmup", False)  # first-touch page cache and library warm-up count for no one
    results: dict[str, dict] = {}
    seconds, result = timed(lambda: ours("loratool", False))
    results["loratool"] = {"seconds": seconds, "errors": {m.name: m.relative_error for m in result.modules}}
    if not args.skip_peers:
        seconds, result = timed(lambda: ours("exact", True))
        results["exact"] = {"seconds": seconds, "errors": {m.name: m.relative_error for m in result.modules}}
        seconds, errors = timed(lambda: peers_extract(base, tuned, outputs / "peers", args.rank, args.device))
        results["peers"] = {"seconds": seconds, "errors": errors}
    cli = [sys.executable, "-m", "loratool", "-q", "svd-extract", str(base), str(tuned), "-o", str(outputs / "cli"),
           "--rank", str(args.rank), "--device", args.device]
    seconds, _ = timed(lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL))
    results["loratool CLI"] = {"seconds": seconds}

    optimum = results.get("peers", results.get("exact", results["loratool"]))["errors"]
    summary = {"spec": spec, "rank": args.rank, "device": args.device, "modules": len(optimum)}
    for name, entry in results.items():
        row = {"seconds": round(entry["seconds"], 2)}
        if "peers" in results:
            row["speedup_vs_peers"] = round(results["peers"]["seconds"] / entry["seconds"], 1)
        if "errors" in entry:
            ratios = [entry["errors"][m] / optimum[m] for m in optimum]
            total = math.sqrt(sum(entry["errors"][m] ** 2 for m in optimum) / sum(optimum[m] ** 2 for m in optimum))
            row.update(worst_error_ratio=round(max(ratios), 4), overall_error_ratio=round(total, 4),
                       mean_relative_error=round(sum(entry["errors"].values()) / len(optimum), 4))
        summary[name] = row
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"svd-extract benchmark, rank {args.rank}, {len(optimum)} modules, {spec}, device {args.device}")
    print(f"{'method':14s} {'seconds':>9s} {'× vs peers':>11s} {'worst err/opt':>14s} {'all err/opt':>12s}")
    for name in results:
        row = summary[name]
        print(f"{name:14s} {row['seconds']:9.2f} {row.get('speedup_vs_peers', float('nan')):11.1f} "
              f"{row.get('worst_error_ratio', float('nan')):14.4f} {row.get('overall_error_ratio', float('nan')):12.4f}")


if __name__ == "__main__":
    main()
