#!/usr/bin/env bash
# The GPU check, one run of a few minutes on a machine with an NVIDIA GPU and the project installed
# (`make install`; the wheels of torch with CUDA):
#   1. features at ViT-L-14 (random weights, bf16 autocast) on the GPU: images/s, against the same stage on
#      the machine's CPU cores (a few batches: the per-image rate is steady) in the same run;
#   2. distillation from stored ViT-L-14 features: the stage's training step on the GPU (samples/s, stored
#      features against the teacher on the fly) and a BART-base-sized student's model FLOPs utilisation;
#      then the same step on the CPU.
# Every table goes to $OUT (default benchmarks/gpu-results/), one markdown file per measurement, and to
# stdout. docs/benchmarks.md keeps the measured ones.
#
#   bash benchmarks/gpu.sh                      # on the GPU machine
#   GPU_DEVICE=cpu SMALL=1 bash benchmarks/gpu.sh   # a check of the script itself, anywhere (not a measurement)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu-results}
GPU_DEVICE=${GPU_DEVICE:-cuda}
MODEL=${MODEL:-ViT-L-14}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # H100 SXM dense bf16; an H200 has the same compute
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if [[ -n "${SMALL:-}" ]]; then   # seconds, not minutes: the script's plumbing only
    MODEL=${SMALL_MODEL:-ViT-B-32}
    GPU_FEATURES="--images 32 --baseline-images 4 --batch-size 16 --workers 1"
    CPU_FEATURES="--images 16 --baseline-images 4 --batch-size 8 --workers 1"
    GPU_DISTILL="--steps 2 --warmup 1 --batch-size 4 --no-mfu"
    CPU_DISTILL="--steps 2 --warmup 1 --batch-size 4 --no-mfu"
else
    CORES=$(nproc)
    GPU_FEATURES="--images 20000 --baseline-images 200 --batch-size 256 --workers $(( CORES < 16 ? CORES : 16 ))"
    CPU_FEATURES="--images 256 --baseline-images 32 --batch-size 32 --workers 2"
    GPU_DISTILL="--steps 50 --warmup 10 --batch-size 256 --mfu --peak-tflops $PEAK_TFLOPS"
    CPU_DISTILL="--steps 5 --warmup 2 --batch-size 32 --no-mfu"
fi

{
    date -u
    git rev-parse --short HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
    echo "cpu cores: $(nproc)"
} | tee "$OUT/machine.txt"

step() {  # step NAME COMMAND...: run a measurement, keep its table
    local name=$1
    shift
    echo "## $name" | tee "$OUT/$name.md"
    "$@" 2>"$OUT/$name.log" | tee -a "$OUT/$name.md"
}

step features-device "$PYTHON" benchmarks/features.py --model "$MODEL" --device "$GPU_DEVICE" $GPU_FEATURES
step features-cpu "$PYTHON" benchmarks/features.py --model "$MODEL" --device cpu $CPU_FEATURES
step distill-device "$PYTHON" benchmarks/distill.py --teacher-model "$MODEL" --device "$GPU_DEVICE" $GPU_DISTILL
step distill-cpu "$PYTHON" benchmarks/distill.py --teacher-model "$MODEL" --device cpu $CPU_DISTILL

echo "tables in $OUT/"
