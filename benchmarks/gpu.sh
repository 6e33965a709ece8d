#!/usr/bin/env bash
# GPU figures for docs/performance.md: the training/eval suite at 224 px on ResNet-34 (and
# ResNet-18 / MobileNetV2) on one CUDA GPU, within ~8 minutes. Needs only the PyTorch and
# torchvision already installed on the GPU machine plus this repository (no network):
#   bash benchmarks/gpu.sh [output-file]       (default: benchmarks/gpu_results.txt)
# The repository is installed with `pip install --no-deps -e .` when ftn is not importable.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_results.txt}"
python -c "import ftn" 2>/dev/null || pip install --no-deps -e . >/dev/null
methods="full linear bn_head ftn_autograd ftn"
# PEFT baselines only where PEFT happens to be installed (the GPU machine has no registry).
python -c "import peft" 2>/dev/null && methods="$methods lora loha lokr"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out"
timeout 450 python benchmarks/bench_training.py --device cuda --configs resnet34@224 resnet18@224 mobilenet_v2@224 \
    --methods $methods --rounds 20 --eval-rounds 30 --json "${out%.txt}.json" 2>&1 | tee -a "$out"
echo "written: $out"
