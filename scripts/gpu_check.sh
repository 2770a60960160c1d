#!/usr/bin/env bash
# GPU check: genalign against its peers at GPU sizes on one CUDA GPU, with model FLOPs utilisation (MFU).
# Not yet run on a GPU; estimated at 5-8 minutes on one H100 (most of it the timed steps; building the random
# 860M-parameter UNet or the 0.54B LM takes about 5 s on the CPU).
#
# Set-up, once, on a machine with network access (trl is the optional `bench` extra of pyproject.toml):
#     make setup && .venv/bin/pip install -e '.[bench]'
# Run (nothing is installed by this script):
#     bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else gpu_check_out
#
# Parts, each a `genalign-bench` run writing OUT_DIR/<part>.json, .md and .log (a failed part does not stop the next
# ones; the script then exits 1 naming it):
#   image-lora  --suite image: SD 1.5-shape UNet/VAE/CLIP (random weights, 512 px), bf16 autocast, 8 pairs per
#               step, LoRA r 8; genalign vs scripts/diffusers_dpo_loop.py
#   text        --suite text: GPT-2-shape ~0.54B LM, bf16, DPO; genalign vs TRL's DPOTrainer (reference forward
#               every step, and precompute_ref_log_probs=True); needs trl
#   image-full  as image-lora with every UNet weight trained and a frozen reference copy on both sides (run last:
#               two UNets with gradients and AdamW state per side, the most GPU memory of the three)
# then a summary table (run, side, pairs/s, genalign/side, TFLOP/s, MFU) read from the JSON files.
#
# Environment:
#   PYTHON               the interpreter (default .venv/bin/python of this checkout, else python3)
#   GPU_CHECK_PARTS      which parts, in order (default "image-lora text image-full")
#   GPU_CHECK_REPS / GPU_CHECK_STEPS   repetitions per side / timed steps per repetition (default 3 / 3 on a GPU)
#   GPU_CHECK_MEMORY=1   also measure each side's peak memory in a fresh process (about +3 minutes)
#   GPU_CHECK_ALLOW_CPU=1  without a CUDA device, run tiny sizes on the CPU instead of failing (tests the plumbing
#                        of this script; the figures mean nothing)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-${OUT:-gpu_check_out}}
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$root/.venv/bin/python"
  [[ -x "$PYTHON" ]] || PYTHON=python3
fi
parts=${GPU_CHECK_PARTS:-image-lora text image-full}
for part in $parts; do
  case $part in
    image-lora | text | image-full) ;;
    *) echo "gpu_check: unknown part '$part' in GPU_CHECK_PARTS; choose from: image-lora text image-full" >&2
       exit 2 ;;
  esac
done

echo "== GPU"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,clocks.max.sm,power.limit --format=csv \
    || echo "nvidia-smi failed (exit $?)"
else
  echo "nvidia-smi: not found"
fi
if ! "$PYTHON" -c 'import genalign, torch' 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import genalign and torch; run 'make setup' in $root (or set PYTHON=...)" >&2
  exit 2
fi
torch_line=$("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                                             f"{torch.cuda.device_count()} CUDA device(s) visible")')
echo "$torch_line"
if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  sizes=(--image-shape auto --text-shape auto)
  reps=${GPU_CHECK_REPS:-3} steps=${GPU_CHECK_STEPS:-3} warmup=1
elif [[ "${GPU_CHECK_ALLOW_CPU:-}" == 1 ]]; then
  echo "gpu_check: no CUDA device; GPU_CHECK_ALLOW_CPU=1, so tiny sizes on the CPU (plumbing only, not a measurement)"
  sizes=(--image-shape tiny --text-shape tiny)
  reps=${GPU_CHECK_REPS:-1} steps=${GPU_CHECK_STEPS:-1} warmup=0
else
  echo "gpu_check: no CUDA device visible to torch ($torch_line; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})." >&2
  echo "  Run this on a machine with an NVIDIA GPU and a CUDA build of torch (a '+cpu' build needs reinstalling:" >&2
  echo "  make setup with TORCH_INDEX set to a CUDA wheel index), or set GPU_CHECK_ALLOW_CPU=1 to run tiny CPU sizes" >&2
  echo "  that only test this script." >&2
  exit 2
fi
if [[ " $parts " == *" text "* ]] && ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("trl") is None)'; then
  echo "gpu_check: the text part compares with TRL, but trl is not installed for $PYTHON." >&2
  echo "  Install the bench extra: $PYTHON -m pip install -e '$root[bench]' (trl>=1.16,<2), or leave 'text' out of" >&2
  echo "  GPU_CHECK_PARTS (e.g. GPU_CHECK_PARTS='image-lora image-full')." >&2
  exit 2
fi

mkdir -p "$out"
memory=(--no-memory)
if [[ "${GPU_CHECK_MEMORY:-}" == 1 ]]; then
  memory=()
fi
failed=() results=()
for part in $parts; do
  case $part in
    image-lora) suite=(--suite image --image-train lora) ;;
    image-full) suite=(--suite image --image-train full) ;;
    text) suite=(--suite text) ;;
  esac
  cmd=("$PYTHON" -m genalign.bench.cli "${suite[@]}" "${sizes[@]}" --no-levers "${memory[@]}" --reps "$reps"
       --steps "$steps" --warmup "$warmup" --json "$out/$part.json" --markdown "$out/$part.md"
       --note "scripts/gpu_check.sh:$part")
  rm -f "$out/$part.json" "$out/$part.md"
  printf -v shown ' %q' "${cmd[@]:3}"
  echo "== $part: genalign-bench$shown"
  start=$SECONDS
  if "${cmd[@]}" 2>&1 | tee "$out/$part.log"; then
    results+=("$out/$part.json")
    echo "== $part: done in $((SECONDS - start)) s"
  else
    failed+=("$part")
    echo "== $part: FAILED after $((SECONDS - start)) s (log: $out/$part.log)" >&2
  fi
done

echo "== summary (genalign/side: ratio of pairs/s per repetition, median [IQR]; MFU against the bf16 dense peak)"
if ((${#results[@]})); then
  "$PYTHON" -m genalign.bench.summary "${results[@]}" | tee "$out/summary.txt"
fi
if ((${#failed[@]})); then
  echo "gpu_check: failed parts: ${failed[*]} (see their .log files in $out)" >&2
  exit 1
fi
echo "gpu_check: all parts done in $SECONDS s; results in $out"
