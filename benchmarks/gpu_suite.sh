#!/usr/bin/env bash
# One-shot GPU suite for a lent H100/H200 (about 15 minutes of device time in all, one run):
#   1. install the package there (its image has CUDA torch + Triton; the wheels it lacks travel
#      in .whl/, made here by `bash benchmarks/gpu_suite.sh --fetch-wheels`)
#   2. the GPU-only tests: Triton compiled for real, CUDA-graph tokens == eager tokens (masked,
#      AR, hybrid, the slot runtime's ladder), flash-attn stage 0 when installed, the CUDA
#      default precision
#   3. launches per masked step: eager, compiled, CUDA graphs (profiler)
#   4. latency JSON, magnet-small 10 s, batch 1 and 8: the reference loop, eager, compiled and
#      CUDA graphs side by side in one run
#   5. the slot runtime (continuous batching): its ladder captured at start-up (seconds per
#      shape), then mixed rows replayed on it, eager vs CUDA graphs
#   6. PlayDiffusion latency (one edit, 10 s TTS) at its default sizes
# Results land in $OUT (the device tool brings that folder back) or benchmarks/results/.
#
#   bash benchmarks/gpu_suite.sh --dry-run      # CPU: the same steps on a tiny model (CI runs it)
#   bash benchmarks/gpu_suite.sh                 # on the GPU, within 8 minutes
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels)
    # What the GPU image lacks, for its Python 3.12 (it has torch, triton, numpy, tqdm, ...).
    mkdir -p .whl
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "transformers==4.57.1" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3" \
      "soundfile" "einops" "encodec==0.1.1" "tokenizers==0.22.1" "huggingface_hub==0.36.0"
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start )) s: $*"; }

if [ "$MODE" = gpu ]; then
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
  ARCH=small; DURATION=10; BATCHES="1 8"; RUNS=3; WARMUP=1; DEVICE=cuda
  VARIANTS="eager compile graphs"
  SLOT_ROWS=8; SLOT_VARIANTS="eager graphs"; SLOT_STEPS="20 10 10 10"   # compiling the ladder: minutes
else
  PY=${PYTHON:-.venv/bin/python}
  ARCH=tiny; DURATION=1; BATCHES="1"; RUNS=1; WARMUP=0; DEVICE=cpu
  VARIANTS="eager"     # compile is exercised by the launch count above; graphs need CUDA
  SLOT_ROWS=2; SLOT_VARIANTS="eager compile"; SLOT_STEPS="2 1 1 1"
fi

stamp "GPU-only tests"
if [ "$MODE" = gpu ]; then
  # the GPU tests live beside their concern (decoding, hybrid, precision, kernels, speech) under the marker gpu
  $PY -m pytest -q -x -m gpu tests 2>&1 | tee "$RESULTS/gpu_tests.log" | tail -5
else
  $PY -m pytest -q --collect-only -m gpu tests | tail -2   # they collect; they need CUDA to run
fi

stamp "launches per masked step"
$PY benchmarks/step_launches.py --arch "$ARCH" --duration "$DURATION" --device "$DEVICE" --steps 3 \
    --out "$RESULTS/step_launches_${MODE}.json"

stamp "latency: reference loop, eager, compiled, CUDA graphs"
# shellcheck disable=SC2086
$PY -m magnet_engine.bench --arch "$ARCH" --duration "$DURATION" --device "$DEVICE" --batch $BATCHES \
    --variants $VARIANTS --runs "$RUNS" --warmup "$WARMUP" --out "$RESULTS/latency_${MODE}_suite.json"

stamp "slot runtime: the ladder warmed at start-up, then mixed rows on it"
# shellcheck disable=SC2086
$PY benchmarks/slot_ladder.py --arch "$ARCH" --device "$DEVICE" --rows "$SLOT_ROWS" --variants $SLOT_VARIANTS \
    --steps $SLOT_STEPS --out "$RESULTS/slot_ladder_${MODE}.json"

if [ "$MODE" = gpu ]; then
  stamp "PlayDiffusion: one edit and 10 s TTS (default sizes, fp32 and bf16)"
  $PY benchmarks/playdiffusion.py --preset default --device cuda --precision fp32 bf16 \
      --out "$RESULTS/playdiffusion_gpu.json" || echo "PlayDiffusion benchmark failed (see above)"
  stamp "PlayDiffusion: the unmask step eager vs CUDA graphs, interleaved"
  $PY benchmarks/playdiffusion.py --preset default --device cuda --precision bf16 --modes edit \
      --variants eager graphs --repeats 3 --out "$RESULTS/playdiffusion_gpu_step_variants.json" \
      || echo "PlayDiffusion step variants failed (see above)"
fi

stamp "done"
