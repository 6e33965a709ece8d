#!/usr/bin/env bash
# GPU figures for docs/performance.md, as ONE prepared run on one CUDA GPU (~12 minutes at most,
# every step bounded by `timeout`). Needs only the PyTorch / torchvision (and PEFT, if present)
# already installed on the machine plus this repository, used from src/ (no pip install, no
# network):
#   bash benchmarks/gpu.sh                 results in $OUT if set, else benchmarks/gpu_results/
#   GPU_SH_QUICK=1 bash benchmarks/gpu.sh  tiny settings, falls back to the CPU: a dry run of every step
# Steps: (a) training step fp32 + peak GPU memory + eval / unmerged inference latency on ResNet-34,
# ResNet-18, MobileNetV2 at 224 px (batch 32) and MobileNetV2 at 64 px (batch 64); (b) the same
# under bf16 autocast; (e) the training step under torch.compile (MobileNetV2 64 px; FTN also at
# LoRA's placement);
# (c) all tasks in one pass vs the loop at batch 1, T = 2, 4, 8; (d) mixed-task batches. A failed or timed-out step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/gpu_results}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu_log.txt") 2>&1
py="$(command -v python3 || command -v python)"
quick="${GPU_SH_QUICK:-0}"
device=cuda
if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    if [ "$quick" = 1 ]; then device=cpu; echo "no CUDA device: dry run on the CPU"
    else echo "no CUDA device (GPU_SH_QUICK=1 runs a CPU dry run)"; exit 1; fi
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"
methods="full linear bn_head ftn_autograd ftn"
"$py" -c "import peft; print('peft', peft.__version__)" && methods="$methods lora"

failed=()
step() {  # step SECONDS command...: run with a timeout, report failure, carry on
    local limit=$1; shift
    echo; echo "== $(date +%T) [timeout ${limit}s] $*"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    [ $rc -eq 0 ] || { echo "!! rc=$rc: $*"; failed+=("$* (rc $rc)"); }
}

if [ "$quick" = 1 ]; then
    configs="mobilenet_v2@64:4"; train=(--rounds 2 --warmup 1 --eval-rounds 2 --threads 1)
    t_train=300; t_multi=200; t_mixed=120
    multi=(--configs "mobilenet_v2@64 b16" --tasks 2 --rounds 1 --threads 1)
    mixed=(--size 32 --batch 8 --tasks 2 --rounds 1 --threads 1)
    compile_configs="mobilenet_v2@64:4"; compile_train=(--rounds 2 --warmup 2 --eval-rounds 1 --threads 1); t_compile=400
else
    # GPU_SH_* shrink the run when less device time is left (defaults: the full ~12-minute run;
    # GPU_SH_T_COMPILE=0 drops the compiled step, back to ~8 minutes).
    configs="${GPU_SH_CONFIGS:-resnet34@224:32 resnet18@224:32 mobilenet_v2@224:32 mobilenet_v2@64:64}"
    r="${GPU_SH_ROUNDS:-30}"
    train=(--rounds "$r" --warmup 3 --eval-rounds "$r")
    t_train="${GPU_SH_T_TRAIN:-170}"; t_multi="${GPU_SH_T_MULTI:-90}"; t_mixed="${GPU_SH_T_MIXED:-50}"
    IFS=, read -r -a mconfigs <<< "${GPU_SH_MULTI_CONFIGS:-resnet18@224 b1,resnet34@224 b1,mobilenet_v2@224 b1}"
    multi=(--configs "${mconfigs[@]}" --tasks 2 4 8 --rounds "${GPU_SH_MULTI_ROUNDS:-50}")
    mixed=(--tasks 2 8 --rounds 20)
    # One config: compiling takes ~30-60 s per method; the JSON is written once the config is done.
    compile_configs="${GPU_SH_COMPILE_CONFIGS:-mobilenet_v2@64:64}"
    compile_train=(--rounds "$r" --warmup 3 --eval-rounds 5)
    t_compile="${GPU_SH_T_COMPILE:-240}"
fi
compile_methods="full bn_head ftn ftn_lora_layers"
"$py" -c "import peft" 2>/dev/null && compile_methods="$compile_methods lora"

# (a) + (b): step time, peak GPU memory (--memory), eval latency unmerged / merged vs the backbone.
# shellcheck disable=SC2086
step $t_train "$py" benchmarks/bench_training.py --device $device --configs $configs --methods $methods \
    "${train[@]}" --memory --json "$out/results_gpu_train_fp32.json"
# shellcheck disable=SC2086
step $t_train "$py" benchmarks/bench_training.py --device $device --amp bf16 --configs $configs --methods $methods \
    "${train[@]}" --memory --json "$out/results_gpu_train_bf16.json"
# (e, before the rest) the training step under torch.compile (inductor; compilation excluded): on a
# GPU these steps are bound by kernel launches, which compiling is the way to cut.
# GPU_SH_T_COMPILE=0 skips it.
if [ "$t_compile" != 0 ]; then
    # shellcheck disable=SC2086
    step $t_compile "$py" benchmarks/bench_training.py --device $device --compile --configs $compile_configs \
        --methods $compile_methods "${compile_train[@]}" --json "$out/results_gpu_train_compile.json"
fi
# (f) ops per step and host syncs: every counted training step and eval forward runs under
# torch.cuda.set_sync_debug_mode("error"), so a sync in FTN code fails the step.
step 120 "$py" benchmarks/bench_ops.py --device $device --sync-debug --json "$out/results_gpu_ops.json"
# (c) all tasks in one pass vs the per-task loop, batch 1.
step $t_multi "$py" benchmarks/bench_multitask.py --device $device "${multi[@]}"
# (d) mixed-task batches.
step $t_mixed "$py" benchmarks/bench_mixed.py --device $device "${mixed[@]}"

echo; echo "== summary (targets: overhead over the floor <= 0.5, FTN <= LoRA, memory <= 0.95x full, unmerged eval <= 1.02x)"
"$py" - "$out" <<'EOF'
import json, os, sys
for amp in ("fp32", "bf16", "compile"):
    path = os.path.join(sys.argv[1], f"results_gpu_train_{amp}.json")
    if not os.path.exists(path):
        print(amp, "missing"); continue
    for res in json.load(open(path))["results"]:
        rows, s = res["methods"], res["summary"]
        ratios = " ".join(f"{k}={r['ratio_vs_full']:.3f}" for k, r in rows.items())
        print(f"{amp} {res['config']}: {ratios} | {json.dumps(s)}")
EOF
if [ ${#failed[@]} -gt 0 ]; then printf '!! failed: %s\n' "${failed[@]}"; exit 1; fi
echo "all steps done; results in $out"
