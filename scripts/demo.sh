#!/usr/bin/env bash
# The demo behind `make demo`: inspect, merge, svd-extract, resize, combine, convert (also to GGUF) and extract on
# the bundled fixtures (fixtures/make_fixtures.py), a LyCORIS LoHa file (scripts/lycoris_demo_file.py)
# inspected and converted, a tiny native Wan file merged with a musubi LoRA (scripts/wan_demo_files.py),
# quantized to ComfyUI's scaled FP8 while merging and merged into again, a LoRA merged into a Q8_0 GGUF
# made by llama.cpp's converter, then export-onnx and a short bench-onnx.
set -euo pipefail
BIN=$(cd "${1:-.venv/bin}" && pwd)
LT="$BIN/loratool"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$LT" inspect fixtures/tiny-llama
step "$LT" inspect fixtures/lora-llama
step "$LT" inspect fixtures/lora-llama-qv --json
step "$LT" merge fixtures/tiny-llama fixtures/lora-llama -o "$OUT/merged"
step "$LT" merge fixtures/tiny-llama fixtures/lora-llama fixtures/lora-llama-qv --weights 0.7,0.3 --dtype bfloat16 -o "$OUT/mixed"
step "$LT" inspect "$OUT/mixed" --check
step "$LT" merge "$OUT/merged" fixtures/lora-llama --weights -1 -o "$OUT/restored"
"$BIN/python" - "$OUT/restored/model.safetensors" fixtures/tiny-llama/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file
restored, base = (load_file(p) for p in sys.argv[1:3])
worst = max((restored[k] - base[k]).abs().max().item() for k in base)
print(f"unmerge with --weights -1 gives back the base: max |diff| = {worst:.2e}")
PY
step "$LT" svd-extract fixtures/tiny-llama "$OUT/merged" --rank 8 -o "$OUT/extracted"
step "$LT" --quiet svd-extract fixtures/tiny-llama "$OUT/mixed" --energy 0.9 -o "$OUT/by-energy"
step "$LT" resize fixtures/lora-llama --rank 4 -o "$OUT/lora-r4"
step "$LT" combine fixtures/lora-llama fixtures/lora-llama-qv --method cat --weights 0.7,0.3 -o "$OUT/cat"
step "$LT" --quiet combine fixtures/lora-llama fixtures/lora-llama-qv --method ties --density 0.5 --rank 8 -o "$OUT/ties"
step "$LT" convert fixtures/lora-llama-qv --to kohya -o "$OUT/qv-kohya.safetensors"
step "$LT" convert "$OUT/qv-kohya.safetensors" --to peft --base fixtures/tiny-llama -o "$OUT/qv-back"
"$BIN/python" - fixtures/lora-llama-qv "$OUT/qv-back" <<'PY'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{p}/adapter_model.safetensors") for p in sys.argv[1:3])
same = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
print(f"peft -> kohya -> peft round trip is bit-exact: {same}")
PY
step "$LT" convert fixtures/lora-llama-qv --to gguf --base fixtures/tiny-llama -o "$OUT/qv.gguf" --dtype float16
step "$LT" inspect "$OUT/qv.gguf"
step "$LT" extract fixtures/loralib-tiny/eval.safetensors --alpha 8 --base fixtures/loralib-tiny/pretrained.safetensors -o "$OUT/loralib-adapter" --base-out "$OUT/loralib-base.safetensors"
"$BIN/python" scripts/sd_demo_files.py "$OUT"
step "$LT" inspect "$OUT/tiny-sd1.safetensors"
step "$LT" inspect "$OUT/style-lora.safetensors"
printf '\n\033[1m$ %s\033[0m   (single-file SD checkpoint + kohya LoRA in LDM names; no -o: named after both)\n' "cd $OUT && $LT merge tiny-sd1.safetensors style-lora.safetensors"
(cd "$OUT" && "$LT" merge tiny-sd1.safetensors style-lora.safetensors)
"$BIN/python" scripts/wan_demo_files.py "$OUT"
step "$LT" inspect "$OUT/tiny-wan.safetensors"
step "$LT" inspect "$OUT/wan-musubi-lora.safetensors"
step "$LT" merge "$OUT/tiny-wan.safetensors" "$OUT/wan-musubi-lora.safetensors" -o "$OUT/wan-merged.safetensors"
"$BIN/python" - "$OUT/tiny-wan.safetensors" "$OUT/wan-musubi-lora.safetensors" "$OUT/wan-merged.safetensors" <<'PY'
import sys
from safetensors.torch import load_file
base, lora, merged = (load_file(p) for p in sys.argv[1:4])
worst = 0.0
for key, w in base.items():
    name = "lora_unet_" + key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
    expected = w.double()
    if f"{name}.lora_down.weight" in lora:
        down, up = lora[f"{name}.lora_down.weight"].double(), lora[f"{name}.lora_up.weight"].double()
        expected = expected + float(lora[f"{name}.alpha"]) / down.shape[0] * up @ down
    worst = max(worst, (merged[key].double() - expected).abs().max().item())
print(f"musubi Wan LoRA into a native Wan file (ComfyUI's model.diffusion_model.): max |merged - (W + alpha/r*B@A)| = {worst:.2e}")
PY
step "$LT" merge "$OUT/tiny-wan.safetensors" "$OUT/wan-musubi-lora.safetensors" --dtype float8_e4m3fn -o "$OUT/wan-fp8.safetensors"
step "$LT" inspect "$OUT/wan-fp8.safetensors"
step "$LT" merge "$OUT/wan-fp8.safetensors" "$OUT/wan-musubi-lora.safetensors" --weights -1 -o "$OUT/wan-fp8-unmerged.safetensors"
step "$LT" merge fixtures/gguf-base/tiny-llama-q8_0.gguf fixtures/lora-llama -o "$OUT/merged-q8_0.gguf"
step "$LT" inspect "$OUT/merged-q8_0.gguf"
"$BIN/python" scripts/lycoris_demo_file.py "$OUT"
step "$LT" inspect "$OUT/style-loha.safetensors"
step "$LT" convert "$OUT/style-loha.safetensors" --to peft --base "$OUT/tiny-unet" -o "$OUT/loha-peft"
step "$LT" convert "$OUT/style-loha.safetensors" --to diffusers --rank 8 --base "$OUT/tiny-unet" -o "$OUT/loha-as-lora.safetensors"
step "$LT" push fixtures/lora-llama-qv me/demo-lora --dry-run --card-overwrite --base-model meta-llama/Llama-3.2-1B
printf '\n\033[1m$ %s\033[0m   (a refusal: the output already exists)\n' "$LT merge fixtures/tiny-llama fixtures/lora-llama -o $OUT/merged"
"$LT" merge fixtures/tiny-llama fixtures/lora-llama -o "$OUT/merged" || echo "exit code $?"
step "$LT" export-onnx fixtures/tiny-llama --adapter fixtures/lora-llama -o "$OUT/onnx"
step "$LT" bench-onnx fixtures/tiny-llama --adapter fixtures/lora-llama --seq 32 --repeats 30 --provider cpu --work "$OUT/bench"
