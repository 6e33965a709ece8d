#!/usr/bin/env bash
# The text and dense comparisons and the budget comparisons as four `ftn sweep` runs at once on
# one CUDA GPU, with the sweep's protocol (three learning rates per method extended at an edge
# choice, TAPS's λ chosen on validation with its rate, each budget arm's rate chosen on
# validation, the calibrated interval): the README's commands, plus
# train.device=cuda train.amp=off (fp32, as on the CPU) and more workers. Every sweep resumes,
# so running the script again finishes what a deadline cut off.
#   bash benchmarks/gpu_sweeps.sh                       sweeps under outputs/gpu_sweeps/
#   GPU_SWEEPS_QUICK=1 bash benchmarks/gpu_sweeps.sh    --quick fixtures (a dry run; CPU if no GPU)
# Variables: GPU_SWEEPS_DIR (output folder), GPU_SWEEPS_WORKERS (per sweep, default 4),
# GPU_SWEEPS_LIMIT (seconds per sweep, default none), GPU_SWEEPS_ONLY (names to run, default all:
# text dense text_budget dense_budget), OUT (if set: one .tar.gz per sweep there, without the
# adapters and checkpoints, which the tables and plots do not need).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
py="$(command -v python3 || command -v python)"
dir="${GPU_SWEEPS_DIR:-outputs/gpu_sweeps}"
workers="${GPU_SWEEPS_WORKERS:-4}"
only="${GPU_SWEEPS_ONLY:-text dense text_budget dense_budget}"
mkdir -p "$dir"
device=cuda
"$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || device=cpu
quick=(); [ "${GPU_SWEEPS_QUICK:-0}" = 1 ] && quick=(--quick --seeds 0 1)
common=(--workers "$workers" "${quick[@]}" --no-progress)
over=(train.device=$device train.amp=off)
budget=(--methods ftn --grid method.budget=0.01,0.05 --grid method.budget_allocation=auto,uniform
        --compare-axis method.budget_allocation)
taps=(--tune "taps:method.taps.penalty=0.1,0.3,1")

sweep() {  # sweep NAME "OVERRIDES" OPTIONS...: one sweep in the background, logged to DIR/NAME.log
    local name=$1 extra=$2; shift 2
    case " $only " in *" $name "*) ;; *) return ;; esac
    local limit=()
    [ -n "${GPU_SWEEPS_LIMIT:-}" ] && limit=(timeout -k 10 "$GPU_SWEEPS_LIMIT")
    # overrides last: argparse takes the trailing key=value list only after every option
    # shellcheck disable=SC2086
    echo "== $(date +%T) $name: ftn sweep $* --output $dir/$name ${common[*]} $extra ${over[*]}"
    # shellcheck disable=SC2086
    "${limit[@]}" "$py" -m ftn sweep "$@" --output "$dir/$name" "${common[@]}" $extra "${over[@]}" \
        > "$dir/$name.log" 2>&1 &
}

sweep text "" --demo text --methods ftn full linear norm_head lora taps ftn_unfreeze "${taps[@]}"
sweep dense train.epochs=2 --demo dense --methods ftn full taps ftn_unfreeze lora norm_head "${taps[@]}" \
    --grid full:data.joint=false,true --gain-reference "full[data.joint=false]"
sweep text_budget "" --demo text "${budget[@]}"
sweep dense_budget train.epochs=2 --demo dense "${budget[@]}"
wait
for name in $only; do
    echo "== $name: $(grep -c . "$dir/$name/results.csv" 2>/dev/null || echo no) results.csv lines"
    tail -n 25 "$dir/$name.log"
    if [ -n "${OUT:-}" ]; then
        tar -C "$dir" -czf "$OUT/sweep_$name.tar.gz" --exclude='*.safetensors' --exclude='*.pt' \
            --exclude='*.pt.prev' --exclude=scenes "$name" "$name.log"
    fi
done
